"""Backbone and trained head stitched back together, classifying video frames as they come."""
