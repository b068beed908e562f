"""Part files: resuming an interrupted run's ``.part`` file, and merging per-rank files into one.

Both copy the committed rows of one feature file into a fresh one, through `extract.store`'s
accessors: the layout and its attributes stay the store's alone.
"""

from __future__ import annotations

from pathlib import Path

import h5py

from extract import store
from extract.atomic import atomic_write
from extract.dataset import Classes, Manifest
from extract.errors import UserError, WriteFailed, first_line
from extract.room import NoRoom

# The settings a resumed run must share with the interrupted one. The weights are identified by
# their digest: the same file under another path is fine.
SAME_RUN_KEYS = ("weights_sha256", "preprocess", "backbone", "node", "precision", "store_dtype")


def open_for_resume(
    path: Path, attrs: dict, classes: Classes, manifests: list[Manifest], flip: bool
) -> h5py.File:
    """Continue an interrupted run after checking it was made the same way from the same images.

    The committed rows are copied into a fresh file that replaces the old one: a run killed
    mid-write (or stopped by a full disk) can leave HDF5's own bookkeeping stale, so the old
    file stays readable up to its counters but is not safe to append to.
    """
    with store.open_file(path) as old:
        recorded = store.read_attrs(old)
        for key in SAME_RUN_KEYS:
            made_with = str(recorded.get(key))
            if made_with != str(attrs[key]):
                raise UserError(
                    f"{path}: cannot resume, it was made with {key}={made_with[:80]!r}, "
                    f"this run uses {attrs[key]!r} (use --overwrite to start again)"
                )
        if bool(recorded["flip"]) != flip or store.splits(old) != [m.split for m in manifests]:
            raise UserError(f"{path}: cannot resume, it was made with other --splits or --flip")
        for manifest in manifests:
            if store.progress(old, manifest.split).manifest_sha256 != manifest.sha256():
                raise UserError(
                    f"{path}: cannot resume, the {manifest.split} images differ from the "
                    f"interrupted run (use --overwrite to start again)"
                )
        try:
            with (
                atomic_write(path) as fresh,
                store.create(fresh, attrs, classes, manifests, flip) as file,
            ):
                for manifest in manifests:
                    copy_split(old, file, manifest.split, index_offset=0)
        except (NoRoom, WriteFailed) as error:  # the disk is still full
            raise WriteFailed(
                f"{path}: cannot resume yet ({error}); its rows are kept, free some space "
                f"and rerun with --resume"
            ) from None
        except OSError as error:
            raise UserError(
                f"{path}: the interrupted run's file is damaged ({first_line(error)}); "
                f"start again with --overwrite"
            ) from None
    return h5py.File(path, "r+")


def copy_split(
    source: h5py.File, target: h5py.File, split: str, index_offset: int, block_rows: int = 8192
) -> None:
    """Append the committed rows and failures of `split` in `source` to `target`, then its
    progress, shifted by `index_offset` manifest positions."""
    done = store.progress(source, split)
    flip = store.split_info(source, split).flip
    for start in range(0, done.rows, block_rows):
        stop = min(start + block_rows, done.rows)
        store.append(
            target[split],
            store.read_rows(source, split, "features", start, stop),
            store.read_rows(source, split, "features_flip", start, stop) if flip else None,
            store.read_rows(source, split, "labels", start, stop).tolist(),
            store.read_paths(source, split, start, stop),
            [],
            store.progress(target, split).next_index,
        )
    failed = store.read_failed(source, split)
    store.append(target[split], None, None, [], [], failed, index_offset + done.next_index)


def merge(
    parts: list[Path],
    out_part: Path,
    classes: Classes,
    manifests: list[Manifest],
) -> h5py.File:
    """Concatenate complete per-rank files, in rank order, into one file of the usual layout.

    Each part holds a contiguous slice of every split's manifest; a missing or incomplete part
    is an error (a virtual dataset would read it silently as zeros).
    """
    sources = [store.open_complete(part) for part in parts]
    try:
        first = sources[0]
        recorded = store.read_attrs(first)
        attrs = store.root_attributes(
            store.provenance(first),
            feature_dim=store.feature_dim(first),
            **{
                key: str(recorded[key])
                for key in ("precision", "store_dtype", "torch_version", "torchvision_version")
            },
        )
        file = store.create(out_part, attrs, classes, manifests, bool(recorded["flip"]))
        for manifest in manifests:
            offset = 0
            for source in sources:
                copy_split(source, file, manifest.split, offset)
                offset += store.progress(source, manifest.split).manifest_size
        return file
    finally:
        for source in sources:
            source.close()
