"""What identifies the features of a backbone, as the feature file and the checkpoint record it.

Two files carry it (extract/store.py writes it into the HDF5 file, head/checkpoint.py into the
checkpoint) and `live` rebuilds the backbone from it. Kept apart from extract/backbone.py so that
reading it imports neither torchvision nor h5py.
"""

PROVENANCE_KEYS = ("backbone", "node", "weights", "weights_sha256", "preprocess")
