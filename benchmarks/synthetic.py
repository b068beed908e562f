"""Synthetic Tiny-ImageNet-shaped data for benchmarks: real 64x64 JPEG files and fc7-like features.

The images have structure (class-dependent colour gradients, stripes and a disc, plus noise) so
JPEG decoding and compression behave as on photos, not as on flat colour.

Examples:
    python -m benchmarks.synthetic images --out /tmp/bench-data --images 2000 --classes 20
    python -m benchmarks.synthetic images --out /tmp/tiny --images 100000 --val-images 10000
    python -m benchmarks.synthetic features --out /tmp/bench-features.h5 --rows 100000
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from extract import store
from extract.backbone import DEFAULT_BACKBONE, default_preprocess
from extract.dataset import Classes, Manifest

SIZE = 64
# Photo-sized files (`--photos`): ImageNet's typical sizes, mixed as in a real folder.
PHOTO_SIZES = ((500, 375), (375, 500), (500, 333), (500, 400))
FEATURE_DIM = 4096  # the width of AlexNet fc7, the default features
HARD_SIGNAL, HARD_NOISE, HARD_OFFSET = 0.1, 1.5, 2.0  # `write_features(hard=True)`


def wnid(label: int) -> str:
    return f"n{label:08d}"


def image_size(index: int, photos: bool) -> tuple[int, int]:
    """(width, height) of the index-th image."""
    return PHOTO_SIZES[index % len(PHOTO_SIZES)] if photos else (SIZE, SIZE)


def synthetic_image(label: int, index: int, size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    rng = np.random.default_rng(label * 1_000_003 + index)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / height, x / width
    hue = np.array([(label * 37) % 256, (label * 91) % 256, (label * 151) % 256], np.float32)
    angle = rng.uniform(0, np.pi)
    stripes = np.sin((x * np.cos(angle) + y * np.sin(angle)) * rng.uniform(6, 20))
    cx, cy, radius = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.3)]
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < radius**2).astype(np.float32)
    pixels = (
        hue * (0.5 + 0.5 * y[..., None])
        + 50 * stripes[..., None]
        + 80 * disc[..., None]
        + rng.normal(0, 12, (height, width, 3))
    )
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_class(args: tuple[Path, int, int, bool]) -> None:
    root, label, count, photos = args
    folder = root / "train" / wnid(label) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        synthetic_image(label, index, image_size(index, photos)).save(
            folder / f"{wnid(label)}_{index}.JPEG", quality=90
        )


def write_val(root: Path, images: int, classes: int) -> None:
    folder = root / "val" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(images):
        label = index % classes
        name = f"val_{index}.JPEG"
        synthetic_image(label, 10_000_000 + index).save(folder / name, quality=90)
        lines.append(f"{name}\t{wnid(label)}\t0\t0\t{SIZE - 1}\t{SIZE - 1}\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))


def write_images(
    root: Path, images: int, classes: int, val_images: int = 0, photos: bool = False
) -> Path:
    """Write `images` training JPEG files over `classes` classes in Tiny ImageNet layout, and
    `val_images` validation files with their annotations; 64x64, or photo-sized (`photos`)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(f"{wnid(c)}\n" for c in range(classes)))
    (root / "words.txt").write_text("".join(f"{wnid(c)}\tclass {c}\n" for c in range(classes)))
    per_class = [images // classes + (1 if c < images % classes else 0) for c in range(classes)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(write_class, [(root, c, n, photos) for c, n in enumerate(per_class)]))
    if val_images:
        write_val(root, val_images, classes)
    return root


def train_files(root: Path) -> tuple[list[str], list[str]]:
    """The train split's paths and wnids, in the order extract reads the folder."""
    from extract.dataset import read_classes, read_manifest

    classes = read_classes(root)
    manifest = read_manifest(root, "train", classes)
    return manifest.paths, [classes.wnids[label] for label in manifest.labels]


def shard_folder(root: Path) -> Path:
    """Where the benchmarks keep `root`'s train split as tar shards: beside it."""
    return root.with_name(f"{root.name}-shards")


def shard_pattern(root: Path) -> str:
    return f"{shard_folder(root)}/train-*.tar"


def write_shards(root: Path, out: Path, per_shard: int = 1000) -> str:
    """The train split of `root` as WebDataset tar shards in `out`, in the folder's order: each
    sample's key is its path without the suffix, with a ``.jpg`` and a ``.txt`` (the wnid)
    member, as img2dataset writes them. Returns the brace pattern naming the shards."""
    import io
    import tarfile

    paths, wnids = train_files(root)
    out.mkdir(parents=True, exist_ok=True)
    count = -(-len(paths) // per_shard)
    for number in range(count):
        with tarfile.open(out / f"train-{number:05d}.tar", "w") as tar:
            for path, name in list(zip(paths, wnids))[number * per_shard :][:per_shard]:
                key = path.rsplit(".", 1)[0]
                for member, data in (
                    (f"{key}.jpg", (root / path).read_bytes()),
                    (f"{key}.txt", name.encode()),
                ):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"{out}/train-{{00000..{count - 1:05d}}}.tar"


def write_parquet(root: Path, path: Path, row_group: int = 500, copies: int = 1) -> Path:
    """The train split of `root` as one Parquet file as Hugging Face stores images (a
    ``{"bytes", "path"}`` struct and a label column), `copies` times over, a row group of
    `row_group` rows at a time, so the file never sits in memory whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths, wnids = train_files(root)
    schema = pa.schema(
        [
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("label", pa.string()),
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [(p, name) for _ in range(copies) for p, name in zip(paths, wnids)]
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, len(rows), row_group):
            part = rows[start : start + row_group]
            images = [{"bytes": (root / p).read_bytes(), "path": p} for p, _ in part]
            writer.write_table(
                pa.table({"image": images, "label": [n for _, n in part]}, schema=schema),
                row_group_size=row_group,
            )
    return path


def write_features(
    path: Path,
    rows: int,
    classes: int,
    val_rows: int = 10_000,
    signal: float = 1.0,
    noise: float = 1.5,
    block: int = 8192,
    dim: int = FEATURE_DIM,
    hard: bool = False,
) -> Path:
    """A complete feature file of non-negative, sparse fc7-like rows (float16): a random centre
    per class times `signal`, plus Gaussian noise of std `noise`, clipped at 0 as after a ReLU;
    `signal` / `noise` sets how separable the classes are.

    `hard` makes features on which the training settings matter, as on real fc7 (where
    standardising alone moves val top-1 from 32% to 82%): a weak signal, and each dimension
    scaled by its own factor (log-uniform over 1/30..30) on top of a common offset, so that raw
    features are badly conditioned and the learning rate and standardisation decide how far
    a few epochs get."""
    rng = np.random.default_rng(0)
    class_list = Classes(
        wnids=[wnid(c) for c in range(classes)], names=[f"class {c}" for c in range(classes)]
    )
    manifests = []
    for split, count in (("train", rows), ("val", val_rows)):
        labels = rng.integers(0, classes, count).tolist()
        manifests.append(Manifest(split, [f"{split}/{i}.JPEG" for i in range(count)], labels))
    provenance = {
        "backbone": DEFAULT_BACKBONE,
        "node": "classifier.5",
        "weights": "random",
        "weights_sha256": "0" * 64,
        "preprocess": default_preprocess().to_json(),
    }
    attrs = store.root_attributes(
        provenance,
        feature_dim=dim,
        precision="fp32",
        store_dtype="float16",
        torch_version="",
        torchvision_version="",
    )
    if hard:
        signal, noise = HARD_SIGNAL, HARD_NOISE
    centres = rng.gamma(1.0, 1.0, (classes, dim)).astype(np.float32) * signal
    scales = (
        np.exp(rng.uniform(-np.log(30), np.log(30), dim)).astype(np.float32)
        if hard
        else np.ones(dim, np.float32)
    )
    offset = np.float32(HARD_OFFSET if hard else 0.0)
    with store.create(path, attrs, class_list, manifests, flip=False) as file:
        for manifest in manifests:
            labels = np.asarray(manifest.labels)
            for start in range(0, len(labels), block):
                part = labels[start : start + block]
                draws = rng.standard_normal((len(part), dim), np.float32) * noise
                rows = (np.maximum(centres[part] + draws, 0) + offset) * scales
                store.append(
                    file[manifest.split],
                    rows.astype(np.float16),
                    None,
                    part.tolist(),
                    manifest.paths[start : start + block],
                    [],
                    start + len(part),
                )
        store.mark_complete(file)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("kind", choices=("images", "features"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--val-images", type=int, default=0)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--photos", action="store_true", help="photo-sized images, not 64x64")
    args = parser.parse_args()
    if args.kind == "images":
        write_images(args.out, args.images, args.classes, args.val_images, args.photos)
    else:
        write_features(args.out, args.rows, args.classes)


if __name__ == "__main__":
    main()
