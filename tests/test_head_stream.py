"""head.train --stream: shuffled chunk-aligned blocks, bounded memory, the same accuracy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import synthetic
from extract import store
from head import features, grid
from head.features import StreamedSplit
from head.step import stream_batches
from head.training import Settings, train

REPO = Path(__file__).resolve().parents[1]
MB = 10**6
FEATURE_DIM = 4096  # AlexNet fc7, the default features
NONE = lambda line: None  # noqa: E731


def write_features(path: Path, rows: int, classes: int, val_rows: int, signal: float) -> Path:
    """A complete float16 feature file of noisy class centres (`signal` sets how separable)."""
    return synthetic.write_features(path, rows, classes, val_rows, signal, noise=1.0, block=4096)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> Path:
    """5000 train rows of 10 classes, learnable but not perfectly (val top-1 well below 100%)."""
    return write_features(
        tmp_path_factory.mktemp("stream") / "noisy.h5", 5000, 10, 1000, signal=0.04
    )


def test_an_epoch_of_streamed_batches_visits_every_row_once_in_a_shuffled_order(noisy):
    with store.open_complete(noisy) as file:
        stored = file["train/features"][()]
    rows = len(stored)
    split = StreamedSplit(
        noisy, "train", labels=torch.arange(rows), block_rows=256, buffer_blocks=3
    )
    generator = torch.Generator().manual_seed(0)
    batches = list(stream_batches(split, 100, generator))
    seen = torch.cat([labels for _, labels in batches])
    assert sorted(seen.tolist()) == list(range(rows))
    assert [len(labels) for _, labels in batches] == [100] * (rows // 100)
    for batch, labels in batches[:5]:
        np.testing.assert_array_equal(batch.numpy(), stored[labels.numpy()])
    # Shuffled across the blocks of a fill, and a new order in the next epoch.
    assert len(set((seen[:100] // 256).tolist())) == 3
    again = torch.cat([labels for _, labels in stream_batches(split, 100, generator)])
    assert not torch.equal(seen, again)


def test_a_part_of_a_streamed_split_draws_and_reads_only_its_own_rows(noisy):
    """What `--holdout` streams: the kept rows are trained on, each once an epoch, and the held
    rows are read for the selection, in file order; nothing else of the file reaches either."""
    with store.open_complete(noisy) as file:
        stored = file["train/features"][()]
    rows = len(stored)
    whole = StreamedSplit(
        noisy, "train", labels=torch.arange(rows), block_rows=256, buffer_blocks=3
    )
    kept, held = grid.holdout_rows(rows, 0.1, seed=0)
    trained, selected = whole.part(kept), whole.part(held)
    assert (len(trained), len(selected)) == (len(kept), len(held))
    batches = list(stream_batches(trained, 100, torch.Generator().manual_seed(0)))
    seen = torch.cat([labels for _, labels in batches])
    assert sorted(seen.tolist()) == kept.tolist()
    assert [len(labels) for _, labels in batches[:-1]] == [100] * (len(batches) - 1)
    for batch, labels in batches:
        np.testing.assert_array_equal(batch.numpy(), stored[labels.numpy()])
    chunks = list(selected.chunks())
    assert torch.equal(torch.cat([labels for _, labels in chunks]), held)
    np.testing.assert_array_equal(
        torch.cat([batch for batch, _ in chunks]).numpy(), stored[held.numpy()]
    )
    # A part holding every row draws what the whole split draws, batch for batch.
    every = whole.part(torch.arange(rows))
    for (batch, labels), (whole_batch, whole_labels) in zip(
        stream_batches(every, 100, torch.Generator().manual_seed(1)),
        stream_batches(whole, 100, torch.Generator().manual_seed(1)),
        strict=True,
    ):
        assert torch.equal(labels, whole_labels)
        assert torch.equal(batch, whole_batch)


def test_streamed_training_matches_in_memory_accuracy_and_resumes_exactly(noisy, tmp_path):
    settings = Settings(epochs=3, batch_size=50, progress=False)
    cpu = torch.device("cpu")
    in_memory = train(
        features.load(noisy, report=NONE, stream=False),
        tmp_path / "memory",
        settings,
        cpu,
        report=NONE,
    )
    lines = []
    streamed_data = features.load(noisy, report=lines.append, stream=True, max_memory=80 * MB)
    assert isinstance(streamed_data.train, StreamedSplit) and "(2 blocks of 1024" in lines[0]
    streamed = train(streamed_data, tmp_path / "stream", settings, cpu, report=NONE)
    assert 30 < in_memory.history["val_top1"][-1] < 95  # a task where accuracy can differ
    assert abs(streamed.history["val_top1"][-1] - in_memory.history["val_top1"][-1]) < 3
    # Resumed in stream mode after two epochs: exactly the uninterrupted streamed run.
    two = Settings(epochs=2, batch_size=50, progress=False)
    train(streamed_data, tmp_path / "resumed", two, cpu, report=NONE)
    resumed = train(
        streamed_data,
        tmp_path / "resumed",
        Settings(epochs=3, batch_size=50, progress=False, resume=True),
        cpu,
        report=NONE,
    )
    for name in ("weight", "bias"):
        torch.testing.assert_close(resumed.layer[name], streamed.layer[name], rtol=0, atol=0)
    assert resumed.history["val_top1"] == streamed.history["val_top1"]


def test_max_memory_accepts_sizes_with_units():
    assert features.parse_size("2GB") == 2 * 10**9
    assert features.parse_size("500MB") == 500 * 10**6
    assert features.parse_size("1.5GiB") == 3 * 2**29
    with pytest.raises(ValueError, match="not a size"):
        features.parse_size("lots")


# Runs head.train and prints its peak resident memory once it is done, before the interpreter
# tears down (torch's teardown alone can briefly add ~200 MB, which says nothing about training).
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest, large).
MEASURED = (
    "import atexit, re, runpy, sys; atexit.register(lambda: print('peak_rss_kb', "
    "re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1))); "
    "sys.argv = ['head.train', *sys.argv[1:]]; "
    "runpy.run_module('head.train', run_name='__main__')"
)


def peak_rss_mb(argv: list[str]) -> tuple[float, str]:
    """Run head.train with `argv`; its peak resident memory in MB, and its output."""
    result = subprocess.run(
        [sys.executable, "-c", MEASURED, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    peak_kb = int(result.stdout.split("peak_rss_kb")[-1])
    return peak_kb * 1024 / MB, result.stdout


@pytest.mark.slow
def test_streamed_training_stays_under_max_memory_on_a_larger_file(tmp_path):
    bound = 120  # MB
    big = write_features(tmp_path / "big.h5", 30_000, 10, 1000, signal=1.0)
    stored = 31_000 * FEATURE_DIM * 2 / MB
    assert stored > 2 * bound  # 254 MB of float16 features
    small = write_features(tmp_path / "small.h5", 256, 10, 128, signal=1.0)
    common = ["--epochs", "2", "--no-progress"]
    # The interpreter, torch, h5py and matplotlib with one tiny run in memory: what any run costs.
    baseline, _ = peak_rss_mb([*common, "--features", str(small), "--save", str(tmp_path / "b")])
    peak, output = peak_rss_mb(
        [
            *common,
            "--features",
            str(big),
            "--save",
            str(tmp_path / "s"),
            "--max-memory",
            f"{bound}MB",
        ]
    )
    in_memory, _ = peak_rss_mb([*common, "--features", str(big), "--save", str(tmp_path / "m")])
    print(
        f"peak RSS: baseline {baseline:.0f} MB, streamed {peak:.0f} MB, "
        f"in memory {in_memory:.0f} MB; bound {bound} MB"
    )
    assert "streaming from the file" in output and "epoch 2/2" in output
    assert peak <= baseline + bound
    assert in_memory > baseline + bound  # the file would not have fitted
    state = torch.load(tmp_path / "s" / "last.pt", weights_only=True)
    assert state["validation_accuracy"][-1] > 90
