"""The options of an extraction: the one place their defaults are written.

``python -m extract`` takes its flags' defaults from `Options`, and `extract.run` its keywords'
defaults, so the command and the Python API cannot drift apart. Light to import: the image
pipeline is not loaded with it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from extract.backbone import DEFAULT_BACKBONE, IMAGENET
from extract.device import DEFAULT_DEVICE


@dataclasses.dataclass
class Options:
    data: Path | dict[str, str]  # a folder, or SOURCE (`extract.sources`) by split name
    out: Path
    splits: list[str] | None = None  # None: train and val where present
    classes: Path | None = None  # a class file; None: the train split's sorted labels
    image_column: str = "image"  # of Parquet files
    label_column: str = "label"  # of Parquet files and CSV manifests
    backbone: str = DEFAULT_BACKBONE
    node: str | None = None  # None: the input of the backbone's classifier
    weights: str = IMAGENET
    device: str = DEFAULT_DEVICE
    batch_size: int = 128
    workers: int | None = None  # None: `default_workers` of the device
    precision: str = "auto"
    decode: str = "workers"  # or "device": JPEG files decoded on the GPU, batched
    store_dtype: str = "float16"
    resume: bool = False
    overwrite: bool = False
    strict: bool = False
    flip: bool = False
    progress: bool = True
