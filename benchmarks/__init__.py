"""Benchmarks: each runs the project and the plain PyTorch way side by side and prints the ratio."""
