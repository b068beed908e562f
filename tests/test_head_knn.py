"""Weighted k-NN against a brute-force NumPy reference, streamed and in memory, in bounded memory.

On the CPU in float32 (the reference in float64): predictions exactly, probabilities within 1e-5
(no two similarities are closer than float32 can tell on these random rows). The CUDA test
holds the device to the CPU's predictions exactly and its probabilities within 1e-4.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import synthetic
from extract.errors import UserError
from head import features as feature_files
from head import knn
from head.features import SplitTensors

NONE = lambda line: None  # noqa: E731
KS = [1, 3, 10, 50]


def random_split(rows: int, dim: int, classes: int, seed: int, name: str) -> SplitTensors:
    """Noisy class centres; float16 as extract stores them."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 1, (classes, dim))
    labels = rng.integers(0, classes, rows)
    values = np.maximum(centres[labels] + rng.normal(0, 1.2, (rows, dim)), 0)
    return SplitTensors(name, torch.from_numpy(values.astype(np.float16)), torch.from_numpy(labels))


def brute_force(
    train: SplitTensors, query: SplitTensors, k: int, classes: int, temperature: float = 0.07
) -> dict:
    """Every similarity at once in float64, a full sort, then the weighted votes."""
    keys = train.features.double().numpy()
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    rows = query.features.double().numpy()
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    similarities = rows @ keys.T
    nearest = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(rows), classes))
    labels = train.labels.numpy()
    for row in range(len(rows)):
        for column in nearest[row]:
            votes[row, labels[column]] += np.exp(similarities[row, column] / temperature)
    truth = query.labels.numpy()
    own = votes[np.arange(len(truth)), truth]
    above = (votes > own[:, None]).sum(1)
    predictions = votes.argmax(1)
    return {
        "predictions": predictions,
        "probabilities": votes / votes.sum(1, keepdims=True),
        "top1": 100.0 * (predictions == truth).mean(),
        "top5": 100.0 * ((own > 0) & (above < 5)).mean(),
    }


@pytest.mark.parametrize("chunks", [(7, 32), (knn.QUERY_ROWS, knn.TRAIN_ROWS)])
def test_every_k_equals_a_brute_force_numpy_reference(chunks):
    train = random_split(300, 16, 6, 0, "train")
    query = random_split(60, 16, 6, 1, "val")
    results = knn.classify(train, query, KS, 6, query_rows=chunks[0], train_rows=chunks[1])
    assert sorted(results) == KS
    for k in KS:
        expected = brute_force(train, query, k, 6)
        np.testing.assert_array_equal(results[k].predictions.numpy(), expected["predictions"])
        np.testing.assert_allclose(
            results[k].probabilities.numpy(), expected["probabilities"], rtol=1e-5, atol=1e-6
        )
        assert results[k].top1 == pytest.approx(expected["top1"])
        assert results[k].top5 == pytest.approx(expected["top5"])
    # Negative control: the values of k give different answers on these rows.
    assert not np.array_equal(
        results[1].predictions.numpy(), brute_force(train, query, 50, 6)["predictions"]
    )
    assert 20 < results[10].top1 < 100


def test_the_temperature_weights_the_votes():
    train = random_split(300, 16, 6, 0, "train")
    query = random_split(60, 16, 6, 1, "val")
    flat = knn.classify(train, query, [50], 6, temperature=10.0)[50]
    expected = brute_force(train, query, 50, 6, temperature=10.0)
    np.testing.assert_allclose(flat.probabilities.numpy(), expected["probabilities"], rtol=1e-5)
    sharp = knn.classify(train, query, [50], 6)[50]
    assert (sharp.probabilities - flat.probabilities).abs().max() > 0.1


def test_a_streamed_train_and_query_split_give_the_in_memory_result(tmp_path: Path):
    path = synthetic.write_features(tmp_path / "f.h5", 2500, 8, val_rows=300, signal=0.1)
    memory = feature_files.load(path, report=NONE, stream=False)
    streamed = feature_files.load(path, report=NONE, stream=True)
    assert isinstance(streamed.train, feature_files.StreamedSplit)
    assert streamed.train.blocks > 1
    ks = [5, 20, 100]
    expected = knn.classify(memory.train, memory.val, ks, 8)
    got = knn.classify(streamed.train, streamed.val, ks, 8, query_rows=128)
    reference = brute_force(memory.train, memory.val, 20, 8)
    np.testing.assert_array_equal(expected[20].predictions.numpy(), reference["predictions"])
    for k in ks:
        np.testing.assert_array_equal(got[k].predictions.numpy(), expected[k].predictions.numpy())
        torch.testing.assert_close(got[k].probabilities, expected[k].probabilities)
        assert got[k].top1 == expected[k].top1 and got[k].top5 == expected[k].top5
    assert 20 < expected[20].top1 < 100, "hard enough that the answers could differ"


@pytest.mark.parametrize(
    ("ks", "message"),
    [
        ([10, 301], "--knn: k = 301 is larger than the train split (300 images)"),
        ([0, 5], "--knn: k must be at least 1 (got 0)"),
        ([], "--knn: give at least one k"),
    ],
)
def test_k_outside_the_train_split_is_refused_naming_the_flag(ks, message):
    train = random_split(300, 16, 6, 0, "train")
    query = random_split(10, 16, 6, 1, "val")
    with pytest.raises(UserError) as error:
        knn.classify(train, query, ks, 6)
    assert error.value.for_command() == message
    assert str(error.value) == message.removeprefix("--")  # the Python API's words
    assert knn.classify(train, query, [300], 6)[300].predictions.shape == (10,)


def resident_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


# Run in a fresh process: in the suite's own process, pages freed by earlier tests stay
# resident and are reused, so the peak would not show what one search allocates.
MEASURE = """
import gc
from pathlib import Path

from head import knn
from tests.test_head_knn import random_split, resident_bytes

train = random_split(20_000, 32, 10, 0, "train")
query = random_split(2_000, 32, 10, 1, "val")
# A first small search loads what any first call does (kernels' code pages, thread pools).
knn.classify(random_split(300, 32, 10, 2, "train"), query, [10, 200], 10)
gc.collect()
Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
before = resident_bytes("VmRSS")
knn.classify(train, query, [10, 200], 10, query_rows={query_rows}, train_rows={train_rows})
print(resident_bytes("VmHWM") - before)
"""


def peak_growth(query_rows: int, train_rows: int) -> int:
    """How far resident memory rises above its level before one search, in a fresh process."""
    script = MEASURE.format(query_rows=query_rows, train_rows=train_rows)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_peak_memory_stays_within_the_stated_bound_and_the_full_matrix_does_not():
    """CPU: 2,000 queries against 20,000 train rows, whose whole similarity matrix would take
    160 MB; searched in chunks, the rise in resident memory stays within `memory_bytes` plus
    20 MB for the allocator's slack."""
    bound = knn.memory_bytes(2_000, 10, 32, [10, 200], query_rows=256, train_rows=1024)
    assert bound < 20 * 2**20
    assert peak_growth(query_rows=256, train_rows=1024) < bound + 20 * 2**20
    whole = peak_growth(query_rows=2000, train_rows=20_000)
    assert whole > 160 * 10**6, "negative control: one chunk holds the whole matrix"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_predictions_equal_the_cpus():
    """CUDA float32 (no tf32: torch's default for matmul) against the CPU's float32."""
    train = random_split(3000, 64, 10, 0, "train")
    query = random_split(500, 64, 10, 1, "val")
    ks = [10, 20, 100, 200]
    cpu = knn.classify(train, query, ks, 10, train_rows=1000)
    cuda = knn.classify(train, query, ks, 10, device=torch.device("cuda"), train_rows=1000)
    for k in ks:
        assert cuda[k].predictions.device.type == "cuda"
        torch.testing.assert_close(cuda[k].predictions.cpu(), cpu[k].predictions, rtol=0, atol=0)
        torch.testing.assert_close(
            cuda[k].probabilities.cpu(), cpu[k].probabilities, rtol=1e-4, atol=1e-5
        )
