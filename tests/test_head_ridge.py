"""The ridge probe against scikit-learn's RidgeClassifier, and the temperature of its softmax.

All on the CPU. The probe's solutions are computed in float64 and returned as float32 layers;
they are compared with scikit-learn's (float64) within 1e-4.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import RidgeClassifier
from sklearn.preprocessing import StandardScaler

from benchmarks import synthetic
from head import features as feature_files
from head import ridge
from head.features import SplitTensors
from head.model import head_from_layer, unfold_standardization

NONE = lambda line: None  # noqa: E731


def small_split(rows: int = 300, dim: int = 20, classes: int = 4, seed: int = 0) -> SplitTensors:
    """Float32 rows of noisy class centres, far from zero and of unequal scales, so that the
    intercept and the standardisation both matter."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    centres = rng.normal(0, 1, (classes, dim))
    scales = np.logspace(-1, 1, dim)
    values = (centres[labels] + rng.normal(0, 1.5, (rows, dim))) * scales + 5.0
    return SplitTensors(
        "train", torch.from_numpy(values.astype(np.float32)), torch.from_numpy(labels)
    )


@pytest.mark.parametrize("standardize", [False, True])
def test_each_l2_value_equals_scikit_learns_ridge_classifier(standardize):
    split = small_split()
    values = [1e-2, 1.0, 30.0, 1e3]
    fit = ridge.fit_ridge(split, 4, values, standardize=standardize)
    raw = split.features.double().numpy()
    seen = StandardScaler().fit_transform(raw) if standardize else raw
    assert fit.weights.shape == (4, 4, 20) and fit.biases.shape == (4, 4)
    for index, value in enumerate(values):
        reference = RidgeClassifier(alpha=value).fit(seen, split.labels.numpy())
        layer = {key: tensor.double() for key, tensor in fit.layer(index).items()}
        if standardize:
            layer = unfold_standardization(
                layer["weight"], layer["bias"], fit.mean.double(), fit.std.double()
            )
        np.testing.assert_allclose(layer["weight"].numpy(), reference.coef_, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(
            layer["bias"].numpy(), reference.intercept_, rtol=1e-4, atol=1e-4
        )
        # On raw features, the returned layer gives scikit-learn's scores and classes.
        ours = split.features.double() @ fit.weights[index].double().T + fit.biases[index].double()
        np.testing.assert_allclose(
            ours.numpy(), reference.decision_function(seen), rtol=1e-4, atol=1e-4
        )
        np.testing.assert_array_equal(ours.argmax(1).numpy(), reference.predict(seen))
    # Negative control: the values are far enough apart for the comparison to tell them apart.
    other = RidgeClassifier(alpha=values[1]).fit(seen, split.labels.numpy())
    ours = split.features.double() @ fit.weights[0].double().T + fit.biases[0].double()
    assert np.abs(ours.numpy() - other.decision_function(seen)).max() > 1e-3


def test_one_pass_serves_solves_with_and_without_standardisation():
    split = small_split()
    stats = ridge.moments(split, 4)
    for standardize in (False, True, False, True):
        solved = ridge.solve(stats, [1.0], standardize)
        fitted = ridge.fit_ridge(split, 4, [1.0], standardize)
        torch.testing.assert_close(solved.weights, fitted.weights, rtol=0, atol=0)
        torch.testing.assert_close(solved.biases, fitted.biases, rtol=0, atol=0)


def test_the_covariance_summed_in_small_blocks_equals_one_block(monkeypatch):
    split = small_split(rows=250)
    whole = ridge.moments(split, 4)
    monkeypatch.setattr(ridge, "BLOCK_ROWS", 7)
    blocks = ridge.moments(split, 4)
    for name in ("mean", "covariance", "cross", "target_mean"):
        np.testing.assert_allclose(
            getattr(blocks, name), getattr(whole, name), rtol=1e-9, atol=1e-9
        )
    centred = split.features.double().numpy() - whole.mean
    np.testing.assert_allclose(whole.covariance, centred.T @ centred, rtol=1e-9, atol=1e-8)
    targets = np.where(np.arange(4) == split.labels.numpy()[:, None], 1.0, -1.0)
    np.testing.assert_allclose(whole.cross, centred.T @ targets, rtol=1e-9, atol=1e-8)


def test_default_grid_is_twenty_log_spaced_values_around_the_mean_eigenvalue():
    split = small_split()
    fit = ridge.fit_ridge(split, 4)
    covariance = ridge.moments(split, 4).covariance
    mean_eigenvalue = np.trace(covariance) / len(covariance)
    assert len(fit.l2) == 20 and fit.weights.shape == (20, 4, 20)
    np.testing.assert_allclose(fit.l2[0], 1e-5 * mean_eigenvalue, rtol=1e-9)
    np.testing.assert_allclose(fit.l2[-1], 1e3 * mean_eigenvalue, rtol=1e-9)
    np.testing.assert_allclose(np.diff(np.log(fit.l2)), math.log(1e8) / 19, rtol=1e-9)


def test_the_layer_loads_as_an_ordinary_head():
    split = small_split()
    fit = ridge.fit_ridge(split, 4, [1.0], standardize=True)
    layer = head_from_layer(**fit.layer(0), origin="ridge", feature_dim=20)
    with torch.no_grad():
        logits = layer(split.features)
    expected = split.features @ fit.weights[0].T + fit.biases[0]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_streamed_split_gives_the_in_memory_solution(tmp_path):
    """Float16 features of the synthetic generator (D = 4096) read block by block from the
    file, against the same rows in memory: equal within 1e-6 (float64 either way)."""
    path = synthetic.write_features(tmp_path / "f.h5", 1500, 5, val_rows=10, block=512)
    memory = feature_files.load(path, report=NONE, stream=False)
    streamed = feature_files.load(path, report=NONE, stream=True)
    assert isinstance(streamed.train, feature_files.StreamedSplit)
    values = [10.0, 1e4]
    in_memory = ridge.fit_ridge(memory.train, 5, values, standardize=True)
    from_file = ridge.fit_ridge(streamed.train, 5, values, standardize=True)
    torch.testing.assert_close(from_file.weights, in_memory.weights, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(from_file.biases, in_memory.biases, rtol=1e-6, atol=1e-6)


def logits_and_labels(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge scores of a held-out split: near -1 and +1, so far too flat as log-probabilities."""
    rows = small_split(rows=700, seed=seed)
    train = SplitTensors("train", rows.features[:300], rows.labels[:300])
    fit = ridge.fit_ridge(train, 4, [1.0], standardize=True)
    return rows.features[300:] @ fit.weights[0].T + fit.biases[0], rows.labels[300:]


def test_fitted_temperature_minimises_the_nll_of_the_softmax():
    logits, labels = logits_and_labels()
    temperature = ridge.fit_temperature(logits, labels)
    best = ridge.nll(logits, labels, temperature)
    for other in (1.0, 2 * temperature, temperature / 2, temperature * 1.05, temperature / 1.05):
        assert best < ridge.nll(logits, labels, other)
    # An independent reference: the lowest NLL on a fine grid of temperatures.
    grid = np.exp(np.linspace(math.log(1e-3), math.log(1e3), 4001))
    losses = [ridge.nll(logits, labels, value) for value in grid]
    assert abs(math.log(grid[int(np.argmin(losses))]) - math.log(temperature)) < 0.01
    assert temperature < 0.5, "ridge scores need sharpening: T well below 1"


def test_logits_that_separate_every_row_drive_the_temperature_to_its_lower_end():
    labels = torch.tensor([0, 1, 2, 1])
    logits = torch.nn.functional.one_hot(labels, 3).float()
    assert ridge.fit_temperature(logits, labels) == 1e-3
    assert ridge.fit_temperature(-logits, labels) == 1e3
