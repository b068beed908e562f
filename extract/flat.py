"""Features that carry no signal: a split whose stored vectors are all zero, or all the same.

A network with random weights can give them (MobileNetV3's hardswish after a random layer is
zero almost everywhere), and a head trained on them sits at chance for every epoch. `extract`
says so when it ends and `head.train` when it starts, in one line each.
"""

from __future__ import annotations

import h5py

from extract import store

SAMPLE_ROWS = 4096  # the first rows are enough to see it, and cheap to read
MARK = "so a head cannot learn from them"  # in every such warning


def flat_features(file: h5py.File, split: str, name: str) -> str | None:
    """The one-line warning, naming the file `name`, for `split` when its stored features (the
    first `SAMPLE_ROWS`) are all zero or all one vector, else None."""
    rows = store.split_info(file, split).rows
    if rows < 2:
        return None
    sample = store.read_rows(file, split, "features", 0, min(rows, SAMPLE_ROWS))
    if not sample.any():
        seen = "are all zero"
    elif (sample == sample[0]).all():
        seen = "are all the same vector"
    else:
        return None
    provenance = store.provenance(file)
    return (
        f"warning: {name}: the {split} features ({provenance['backbone']} "
        f"{provenance['node']}, weights {provenance['weights']}) {seen}, {MARK}; "
        f"pretrained weights (--weights imagenet) or another --node give features that vary"
    )
