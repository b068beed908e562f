"""The extraction loop: manifests in, batches through the frozen network, rows into the store.

Stages per batch: workers decode and resize to uint8 (`extract.images`), the main process moves
the batch to the device, normalizes it there (`extract.preprocess.normalize`), runs AlexNet to
fc7, and appends the rows to the HDF5 file (`extract.store`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader
from tqdm import tqdm

from extract import backbone, precisions, store
from extract.dataset import Classes, Manifest, default_splits, read_classes, read_manifest
from extract.device import resolve_device
from extract.errors import UserError, WriteFailed
from extract.images import Collate, ManifestImages
from extract.preprocess import Preprocess, normalize, resize_crop
from extract.writer import BackgroundWriter, HostRows


@dataclasses.dataclass
class Options:
    data: Path
    out: Path
    splits: list[str] | None = None  # None: train and val where present
    weights: str = "imagenet"
    device: str = "auto"
    batch_size: int = 128
    workers: int = min(8, os.cpu_count() or 1)
    precision: str = "auto"
    store_dtype: str = "float16"
    resume: bool = False
    overwrite: bool = False
    strict: bool = False
    flip: bool = False
    progress: bool = True


@dataclasses.dataclass
class Summary:
    images: int
    failed: int
    seconds: float
    file_bytes: int
    already_complete: bool = False

    def line(self, out: Path) -> str:
        if self.already_complete:
            return f"{out} is already complete; nothing to do"
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        return (
            f"extracted {self.images} images, {self.failed} failed, {self.seconds:.1f} s, "
            f"{rate:.0f} images/s, {out} {self.file_bytes / 1e6:.1f} MB"
        )


def make_loader(
    root: Path,
    manifest: Manifest,
    start: int,
    options: Options,
    params: Preprocess,
    device: torch.device,
) -> DataLoader:
    """Workers decode (and on the CPU also resize); on CUDA the GPU resizes whole batches."""
    files = ManifestImages(root, manifest.paths, range(start, len(manifest.paths)))
    return DataLoader(
        files,
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=options.workers,
        collate_fn=Collate(params, defer_resize=device.type == "cuda"),
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if options.workers > 0 else None,
    )


def check_readable(
    root: Path, manifests: list[Manifest], options: Options, params: Preprocess
) -> None:
    """--strict: decode every image before anything is written; fail on the first bad one."""
    failures = []
    total = sum(len(m.paths) for m in manifests)
    with tqdm(total=total, unit="img", desc="checking", disable=not options.progress) as bar:
        for manifest in manifests:
            for batch in make_loader(root, manifest, 0, options, params, torch.device("cpu")):
                failures.extend((manifest.paths[i], reason) for i, reason in batch.failed)
                bar.update(options.batch_size)
    if failures:
        path, reason = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise UserError(f"{root / path}: unreadable image, {reason}{more}; --strict stops here")


def acquire_lock(out: Path):
    """Hold an exclusive lock next to the output so two runs never write the same file."""
    lock_path = out.with_name(out.name + ".lock")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a")
    except OSError as error:
        raise UserError(f"{out}: cannot write here ({error.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"{out}: another extract run is writing this file") from None
    return handle


def read_dataset(options: Options) -> tuple[Classes, list[Manifest]]:
    """The class list and the manifest of every requested split."""
    classes = read_classes(options.data)
    split_names = options.splits or default_splits(options.data)
    return classes, [read_manifest(options.data, split, classes) for split in split_names]


def run(options: Options) -> Summary:
    """Extract every requested split into `options.out`; resumable and crash-safe."""
    classes, manifests = read_dataset(options)
    return extract_to(options, options.out, classes, manifests)


def extract_to(options: Options, out: Path, classes: Classes, manifests: list[Manifest]) -> Summary:
    """Write the features of `manifests` to `out` (through `out.part`), resuming if asked."""
    root = options.data
    device = resolve_device(options.device)
    precision = precisions.resolve(options.precision, device)
    if options.store_dtype not in ("float16", "float32"):
        raise UserError(f"--store-dtype {options.store_dtype}: choose float16 or float32")

    part = store.part_path(out)
    lock = acquire_lock(out)
    try:
        if out.exists() and not options.overwrite:
            if options.resume:
                return Summary(0, 0, 0.0, out.stat().st_size, already_complete=True)
            raise UserError(f"{out}: already exists (use --overwrite to replace it)")
        if part.exists() and not (options.resume or options.overwrite):
            raise UserError(f"{part}: an interrupted run is here (use --resume, or --overwrite)")

        model = backbone.load_alexnet(options.weights)
        params = Preprocess()
        attrs = {
            "backbone": backbone.BACKBONE,
            "node": backbone.FC7_NODE,
            "weights": options.weights,
            "weights_sha256": backbone.state_dict_sha256(model),
            "preprocess": params.to_json(),
            "precision": precision,
            "store_dtype": options.store_dtype,
            "torch_version": torch.__version__,
            "torchvision_version": torchvision.__version__,
        }
        if options.strict:
            check_readable(root, manifests, options, params)
        if options.resume and part.exists():
            file = store.open_for_resume(part, attrs, classes, manifests, options.flip)
        else:
            file = store.create(part, attrs, classes, manifests, options.flip)
        try:
            images, failed, seconds = extract_splits(
                file, model, root, manifests, options, params, device, precision
            )
            store.mark_complete(file)
            file.close()
        except OSError as error:
            close_quietly(file)
            raise WriteFailed(
                f"{part}: writing failed ({error}); the rows written before are kept, "
                f"free some space and rerun with --resume"
            ) from None
        except BaseException:
            close_quietly(file)
            raise
        os.replace(part, out)
        return Summary(images, failed, seconds, out.stat().st_size)
    finally:
        lock.close()


def close_quietly(file) -> None:
    """Close after a failed write; what cannot be closed is left as is for --resume."""
    try:
        file.close()
    except Exception:  # the original error is the one worth reporting
        pass


def extract_splits(
    file,
    model,
    root: Path,
    manifests: list[Manifest],
    options: Options,
    params: Preprocess,
    device: torch.device,
    precision: str,
):
    """Fill every split from where it stopped; returns (images written, failed, seconds)."""
    precisions.set_tf32(precision == "tf32")
    dtype = precisions.DTYPES[precision]
    fc7 = backbone.fc7_extractor(model).to(
        device=device, dtype=dtype, memory_format=torch.channels_last
    )
    store_dtype = np.dtype(options.store_dtype)
    remaining = sum(len(m.paths) - int(file[m.split].attrs["next_index"]) for m in manifests)
    written = failed_count = 0
    started = time.perf_counter()
    with (
        tqdm(
            total=remaining, unit="img", desc="extract", disable=not options.progress, smoothing=0.1
        ) as bar,
        BackgroundWriter() as writer,
    ):
        for manifest in manifests:
            group = file[manifest.split]
            start = int(group.attrs["next_index"])
            bar.set_description(manifest.split)
            for batch in make_loader(root, manifest, start, options, params, device):
                indices, failed = batch.indices, batch.failed
                features = flipped = None
                if batch.pixels is not None:
                    with torch.inference_mode():
                        pixels = batch.pixels.to(device, non_blocking=True)
                        if not batch.resized:
                            pixels = resize_crop(pixels, params)
                        images = normalize(pixels, params, dtype)
                        features = HostRows(fc7(images), store_dtype)
                        if options.flip:
                            flipped = HostRows(fc7(images.flip(3)), store_dtype)
                seen = indices + [i for i, _ in failed]
                writer.submit(
                    group,
                    features,
                    flipped,
                    labels=[manifest.labels[i] for i in indices],
                    paths=[manifest.paths[i] for i in indices],
                    failed=[(manifest.paths[i], reason) for i, reason in failed],
                    next_index=max(seen) + 1,
                )
                written += len(indices)
                failed_count += len(failed)
                bar.update(len(seen))
    return written, failed_count, time.perf_counter() - started
