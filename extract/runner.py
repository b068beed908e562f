"""The extraction loop: manifests in, batches through the frozen network, rows into the store.

Stages per batch: workers decode and resize to uint8 (`extract.images`), the main process moves
the batch to the device, normalizes it there (`extract.preprocess.normalize`), runs the backbone
to its feature node (`extract.backbone`), and appends the rows to the HDF5 file (`extract.store`).

The workers of a fresh run start before the network is built and hashed, so their first batches
are decoded meanwhile: on CUDA, where building the network is most of the start, the first batch
is waiting when the network is ready.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from extract import backbone, flat, lock, parts, precisions, sources, store
from extract.dataset import Classes, Manifest, default_splits, read_classes, read_manifest
from extract.device import resolve_device
from extract.errors import Option, UserError, WriteFailed
from extract.images import DECODERS, Batch, Collate, ManifestImages, crops_on_device
from extract.options import Options
from extract.preprocess import Preprocess, normalize, resize_crop
from extract.writer import BackgroundWriter, HostRows


@dataclasses.dataclass
class Summary:
    images: int
    failed: int
    seconds: float
    file_bytes: int
    already_complete: bool = False
    first_batch_seconds: float = math.nan  # from the call to the first batch on the device
    steady_rate: float = math.nan  # images/s from the first batch on the device to the last write
    warnings: list[str] = dataclasses.field(default_factory=list)  # flat features, per split

    def line(self, out: Path) -> str:
        if self.already_complete:
            return f"{out} is already complete; nothing to do"
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        return (
            f"extracted {self.images} images, {self.failed} failed, {self.seconds:.1f} s, "
            f"{rate:.0f} images/s, {out} {self.file_bytes / 1e6:.1f} MB"
        )


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 matmuls and convolutions while extracting; the caller's settings afterwards (a
    process that trains a head next should not inherit tf32 from extraction)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precisions.set_tf32(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def available_cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def default_workers(device: torch.device) -> int:
    """Decoding processes: on CUDA one per core, since decoding is what limits the rate there
    (a GPU runs AlexNet at tens of thousands of images/s); on the CPU at most 8, which leave
    the cores to the network."""
    cores = available_cores()
    return cores if device.type == "cuda" else min(8, cores)


def make_loader(
    manifest: Manifest,
    start: int,
    options: Options,
    params: Preprocess,
    device: torch.device,
) -> DataLoader:
    """Workers decode (and on the CPU also resize); on CUDA the GPU resizes whole batches.

    Batch k goes to worker k mod the workers, and comes back in order: the workers divide each
    shard's batches among themselves, each reading its own front to back, and rows reach the
    file in manifest order, as resume needs."""
    workers = default_workers(device) if options.workers is None else options.workers
    images = ManifestImages(manifest, options.decode)
    return DataLoader(
        images,
        batch_sampler=manifest.batches(start, options.batch_size),
        num_workers=workers,
        collate_fn=Collate(params, defer_resize=device.type == "cuda", decode=options.decode),
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


def check_readable(manifests: list[Manifest], options: Options, params: Preprocess) -> None:
    """--strict: decode every image before anything is written; fail on the first bad one."""
    failures = []
    total = sum(len(m.paths) for m in manifests)
    with tqdm(total=total, unit="img", desc="checking", disable=not options.progress) as bar:
        for manifest in manifests:
            cpu = torch.device("cpu")
            checking = dataclasses.replace(options, decode="workers")
            for batch in make_loader(manifest, 0, checking, params, cpu):
                failures.extend((manifest, i, reason) for i, reason in batch.failed)
                bar.update(options.batch_size)
    if failures:
        manifest, index, reason = failures[0]
        name = manifest.reader.read([manifest.reader_offset + index])[0][0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise UserError(f"{name}: unreadable image, {reason}{more}; --strict stops here")


def read_dataset(options: Options) -> tuple[Classes, list[Manifest]]:
    """The class list and the manifest of every requested split, each with its reader."""
    data = options.data
    if isinstance(data, dict) and options.splits:
        raise UserError("--splits: with --data SPLIT=SOURCE the sources name the splits")
    if not isinstance(data, dict) and sources.is_source_name(os.fspath(data)):
        data = sources.bare_splits(os.fspath(data), options.splits)
    if isinstance(data, dict):
        return sources.read_sources(
            data, options.classes, options.image_column, options.label_column
        )
    if options.classes is not None:
        raise UserError(f"--classes: {data} has its own classes (use --data train={data})")
    root = Path(data)
    classes = read_classes(root)
    manifests = [
        read_manifest(root, split, classes) for split in options.splits or default_splits(root)
    ]
    return classes, [
        dataclasses.replace(m, reader=sources.folder_files(root, m.paths)) for m in manifests
    ]


def run(options: Options) -> Summary:
    """Extract every requested split into `options.out`; resumable and crash-safe."""
    called = time.perf_counter()
    classes, manifests = read_dataset(options)
    return extract_to(options, options.out, classes, manifests, called)


def extract_to(
    options: Options,
    out: Path,
    classes: Classes,
    manifests: list[Manifest],
    called: float | None = None,
) -> Summary:
    """Write the features of `manifests` to `out` (through `out.part`), resuming if asked.

    `called`: the `time.perf_counter()` the run started at, for `Summary.first_batch_seconds`.
    """
    called = time.perf_counter() if called is None else called
    device = resolve_device(options.device)
    precision = precisions.resolve(options.precision, device)
    if options.store_dtype not in ("float16", "float32"):
        raise UserError(Option("store_dtype", options.store_dtype), ": choose float16 or float32")
    if options.decode not in DECODERS:
        raise UserError(Option("decode", options.decode), f": choose {' or '.join(DECODERS)}")
    if options.decode == "device" and device.type != "cuda":
        raise UserError("--decode device: decoding on the device needs CUDA (use --device cuda)")

    part = store.part_path(out)
    held = lock.acquire(out)
    first_batches = None
    try:
        done = already_written(out, options)
        if done is not None:
            return done
        if part.exists() and not (options.resume or options.overwrite):
            raise UserError(
                f"{part}: an interrupted run is here (use ",
                Option("resume", True),
                ", or ",
                Option("overwrite", True),
                ")",
            )

        fresh = not (options.resume and part.exists()) and not options.strict
        # A fresh run starts at row 0: its first loader can start now and decode while the
        # network is built and hashed (a resumed run learns where to start from the file).
        params = backbone.preprocess_for(options.backbone, options.weights)
        first_batches = (
            iter(make_loader(manifests[0], 0, options, params, device)) if fresh else None
        )
        frozen = backbone.build(options.backbone, options.weights, options.node)
        attrs = store.root_attributes(
            frozen.provenance(),
            feature_dim=frozen.feature_dim,
            precision=precision,
            store_dtype=options.store_dtype,
            torch_version=torch.__version__,
            torchvision_version=torchvision.__version__,
        )
        if options.strict:
            check_readable(manifests, options, params)
        if options.resume and part.exists():
            file = parts.open_for_resume(part, attrs, classes, manifests, options.flip)
        else:
            file = store.create(part, attrs, classes, manifests, options.flip)
        try:
            with tf32(precision == "tf32"):
                images, failed, seconds, timeline = extract_splits(
                    file,
                    frozen.extractor,
                    manifests,
                    options,
                    params,
                    device,
                    precision,
                    first_batches,
                )
            store.mark_complete(file)
            flat_warnings = [flat.flat_features(file, m.split, str(out)) for m in manifests]
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
        first_batch_at, after_first, finished = timeline
        return Summary(
            images,
            failed,
            seconds,
            out.stat().st_size,
            first_batch_seconds=first_batch_at - called,
            steady_rate=after_first / (finished - first_batch_at) if after_first else math.nan,
            warnings=[line for line in flat_warnings if line],
        )
    finally:
        # The early workers inherited the lock's file: on any failure (the network's build,
        # the file's creation) they are stopped here, or the lock would outlive the run.
        first_batches = None
        lock.release(held, out)


def already_written(out: Path, options: Options) -> Summary | None:
    """A complete `out` is kept: with --resume there is nothing to do (its summary), without
    --overwrite it is refused; None when the run goes on."""
    if not out.exists() or options.overwrite:
        return None
    if options.resume:
        return Summary(0, 0, 0.0, out.stat().st_size, already_complete=True)
    raise UserError(f"{out}: already exists (use ", Option("overwrite", True), " to replace it)")


def close_quietly(file) -> None:
    """Close after a failed write; what cannot be closed is left as is for --resume."""
    try:
        file.close()
    except Exception:  # the original error is the one worth reporting
        pass


def extract_splits(
    file,
    extractor: torch.nn.Module,
    manifests: list[Manifest],
    options: Options,
    params: Preprocess,
    device: torch.device,
    precision: str,
    first_batches: Iterator[Batch] | None = None,
):
    """Fill every split from where it stopped; returns (images written, failed, seconds,
    (time of the first batch on the device, images after it, time of the last write)).

    `first_batches`: the first split's batches from row 0, already started by the caller.
    """
    dtype = precisions.DTYPES[precision]
    extractor = extractor.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    remaining = sum(len(m.paths) - store.progress(file, m.split).next_index for m in manifests)
    written = failed_count = after_first = 0
    first_batch_at = math.nan
    started = time.perf_counter()
    with (
        tqdm(
            total=remaining, unit="img", desc="extract", disable=not options.progress, smoothing=0.1
        ) as bar,
        BackgroundWriter() as writer,
    ):
        for number, manifest in enumerate(manifests):
            group = file[manifest.split]
            start = store.progress(file, manifest.split).next_index
            bar.set_description(manifest.split)
            batches = (
                first_batches
                if number == 0 and first_batches is not None and start == 0
                else make_loader(manifest, start, options, params, device)
            )
            for batch in batches:
                computed = write_batch(
                    batch, manifest, group, extractor, writer, options, params, device, dtype
                )
                if computed and math.isnan(first_batch_at):
                    first_batch_at = time.perf_counter()
                else:
                    after_first += computed
                written += len(batch.indices)
                failed_count += len(batch.failed)
                bar.update(len(batch.indices) + len(batch.failed))
    finished = time.perf_counter()
    return written, failed_count, finished - started, (first_batch_at, after_first, finished)


def write_batch(
    batch: Batch,
    manifest: Manifest,
    group,
    extractor: torch.nn.Module,
    writer: BackgroundWriter,
    options: Options,
    params: Preprocess,
    device: torch.device,
    dtype: torch.dtype,
) -> int:
    """Run one batch through the network and queue its rows; returns how many it computed.

    Files the device could not decode move from `batch.indices` to `batch.failed`.
    """
    features = flipped = None
    if batch.indices:
        with torch.inference_mode():
            if batch.unstacked is not None:
                pixels, refused = crops_on_device(batch.unstacked, params, device)
                refused_positions = {position for position, _ in refused}
                batch.failed += [(batch.indices[position], reason) for position, reason in refused]
                batch.indices = [
                    index
                    for position, index in enumerate(batch.indices)
                    if position not in refused_positions
                ]
            else:
                pixels = batch.pixels.to(device, non_blocking=True)
                if not batch.resized:
                    pixels = resize_crop(pixels, params)
            if len(pixels):
                images = normalize(pixels, params, dtype)
                features = HostRows(extractor(images), np.dtype(options.store_dtype))
                if options.flip:
                    flipped = HostRows(extractor(images.flip(3)), np.dtype(options.store_dtype))
    indices, failed = batch.indices, batch.failed
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
    return len(indices)
