"""Run a frozen, pretrained torchvision network once over a dataset; cache its features.

Python API (``python -m extract`` is a thin wrapper around ``run``):

    extract.run(data, out, **options) -> Summary
        Extract the features of an image folder, or of a source per split
        (``{"train": "train.csv", "val": "shards/val-{0000..0007}.tar"}``: folders, CSV
        manifests, tar shards, Parquet files), into one HDF5 file; the options and their
        defaults are those of ``python -m extract`` (``backbone``, ``node``, ``weights``,
        ``splits``, ``classes``, ``device``, ``precision``, ``batch_size``, ``workers``,
        ``resume``, ``overwrite``, ``flip``, ...).
    extract.load(path, lazy=None) -> FeatureFile
        Per split: ``features`` (N x D NumPy array in the stored dtype, or lazily read from the
        file when larger than memory), ``labels``, ``paths``; and ``wnids``, ``names``,
        ``provenance``.
    extract.UserError
        An expected problem (bad input, missing or incomplete file); its message is the line
        the command prints.

Example::

    import extract

    extract.run("tiny-imagenet-200", "resnet50.h5", backbone="resnet50", splits="train,val")
    cache = extract.load("resnet50.h5")
    train = cache["train"]
    print(train.features.shape, train.features.dtype, cache.names[train.labels[0]])
"""

from extract.api import load, run
from extract.errors import UserError

__all__ = ["run", "load", "UserError"]
