"""Run a frozen, pretrained AlexNet once over an image folder and cache its fc7 features in HDF5."""
