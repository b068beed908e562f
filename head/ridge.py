"""The ridge probe: least squares from the features to the classes, for many l2 values at once.

A zero-training baseline beside the trained heads: the weights minimising
``|X W^T + b - Y|^2 + l2 |W|^2`` have a closed form. Everything the l2 values share is computed
once: the features' covariance (D x D, float64, accumulated block by block so the split may be
streamed from the file) and its eigendecomposition S = V diag(e) V^T. Each l2 value is then one
product, W^T = V diag(1 / (e + l2)) V^T X^T Y, as in big_vision's few-shot probe.

The targets follow scikit-learn's `RidgeClassifier`: +1 for the image's class and -1 for every
other class, with an intercept (the features and targets are centred, and the bias restores the
means). Each value's result equals ``RidgeClassifier(alpha=l2)`` fitted on the same features
(on `standardization`'s standardised features with `standardize`), and is returned as a linear
layer on raw features with the standardisation folded in, so it can be saved as an ordinary
checkpoint. Its logits are scores near -1 and +1, not log-probabilities: `fit_temperature`
finds the T for which ``softmax(logits / T)`` gives the lowest NLL on a selection split.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import scipy.linalg
import torch
from scipy.linalg import blas

from head.features import SplitTensors, StreamedSplit, split_blocks
from head.model import fold_standardization

BLOCK_ROWS = 4096  # rows cast to float64 at a time: 128 MiB at D = 4096
DEFAULT_VALUES = 20
# The default l2 grid, as multiples of the covariance's mean eigenvalue (trace / D), so that it
# suits features of any scale or width. At 1e-5 only directions with a hundred-thousandth of the
# average variance are damped: ordinary least squares in all but name. At 1e3 every direction
# but the strongest few is damped a hundredfold or more, so W tends to the class means'
# direction and the predictions stop changing. Twenty values: a factor of 2.6 between neighbours.
RELATIVE_L2_RANGE = (1e-5, 1e3)
STD_FLOOR = 1e-6  # as head.features.standardization: a constant dimension is left unscaled


@dataclasses.dataclass
class RidgeFit:
    """One ridge solution per l2 value, each a linear layer on raw features."""

    l2: list[float]  # absolute values, scikit-learn's `alpha`
    weights: torch.Tensor  # (L, C, D) float32, standardisation folded in
    biases: torch.Tensor  # (L, C) float32
    mean: torch.Tensor | None  # (D,) float32: the standardisation used, None without it
    std: torch.Tensor | None

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        """The `index`-th value's layer as a checkpoint's ``state_dict`` (weight and bias)."""
        return {"weight": self.weights[index].clone(), "bias": self.biases[index].clone()}


@dataclasses.dataclass
class Moments:
    """What one pass over the train split leaves: count, mean, centred covariance and the
    centred features' product with the +-1 targets, all float64 numpy arrays."""

    count: int
    mean: np.ndarray  # (D,)
    covariance: np.ndarray  # (D, D): sum over rows of (x - mean)(x - mean)^T
    cross: np.ndarray  # (D, C): sum over rows of (x - mean) y^T
    target_mean: np.ndarray  # (C,)


def moments(split: SplitTensors | StreamedSplit, num_classes: int) -> Moments:
    """One pass over the split in blocks of float64 rows.

    The rows are shifted by the first block's mean before their products are summed, so the
    covariance is not the small difference of two large sums when the features sit far from
    zero. The products go through BLAS's symmetric rank-k update (dsyrk), which computes one
    triangle: half the work of a matrix product.
    """
    count = 0
    shift = total = class_totals = upper = None
    class_counts = np.zeros(num_classes, dtype=np.int64)
    for features, labels in split_blocks(split, BLOCK_ROWS):
        # A copy even of float64 rows (shifted in place below); torch casts 4x faster than numpy.
        rows = features.to(torch.float64, copy=True).numpy()
        if shift is None:
            shift = rows.mean(axis=0)
            dim = rows.shape[1]
            total = np.zeros(dim)
            class_totals = np.zeros((num_classes, dim))
            upper = np.zeros((dim, dim), order="F")
        rows -= shift
        labels = labels.numpy()
        # rows.T is a Fortran-ordered (D, n) view: dsyrk with trans=0 gives rows.T @ rows.
        upper = blas.dsyrk(1.0, rows.T, beta=1.0, c=upper, trans=0, lower=0, overwrite_c=1)
        total += rows.sum(axis=0)
        torch.from_numpy(class_totals).index_add_(
            0, torch.from_numpy(labels), torch.from_numpy(rows)
        )
        class_counts += np.bincount(labels, minlength=num_classes)
        count += len(labels)
    offset = total / count  # mean - shift
    covariance = np.triu(upper) + np.triu(upper, 1).T - count * np.outer(offset, offset)
    # sum (x - s) y^T with y = +1 for the class, -1 elsewhere: 2 * class sums - total.
    targets = 2.0 * class_counts - count
    cross = (2.0 * class_totals - total).T - np.outer(offset, targets)
    return Moments(
        count=count,
        mean=shift + offset,
        covariance=covariance,
        cross=cross,
        target_mean=targets / count,
    )


def default_l2(covariance: np.ndarray, values: int = DEFAULT_VALUES) -> list[float]:
    """`values` l2 values log-spaced over `RELATIVE_L2_RANGE` times the mean eigenvalue."""
    scale = float(np.trace(covariance)) / len(covariance)
    low, high = (math.log10(value) for value in RELATIVE_L2_RANGE)
    return [scale * value for value in np.logspace(low, high, values).tolist()]


def fit_ridge(
    split: SplitTensors | StreamedSplit,
    num_classes: int,
    l2: Sequence[float] | None = None,
    standardize: bool = False,
) -> RidgeFit:
    """Ridge regression to +-1 class targets for every value in `l2` (default: `default_l2`),
    from one pass over the split and one eigendecomposition.

    Memory beyond the split: about five D x D float64 arrays (the covariance, its eigenvectors
    and LAPACK's workspace: 640 MiB at D = 4096), one block of float64 rows, and the results,
    L x C x D float32.
    """
    return solve(moments(split, num_classes), l2, standardize)


def solve(stats: Moments, l2: Sequence[float] | None = None, standardize: bool = False) -> RidgeFit:
    """`fit_ridge` after the pass over the split: the eigendecomposition and one product for
    all l2 values (apart so that each stage can be timed)."""
    num_classes = stats.cross.shape[1]
    covariance, cross, mean = stats.covariance, stats.cross, stats.mean
    std = None
    if standardize:
        std = np.sqrt(np.clip(np.diag(covariance) / stats.count, 0.0, None))
        std = np.where(std > STD_FLOOR, std, 1.0)
        covariance = covariance / np.outer(std, std)
        cross = cross / std[:, None]
    values = list(l2) if l2 is not None else default_l2(covariance)
    # The standardised covariance is a copy LAPACK may overwrite; the raw one is the caller's,
    # kept so that one pass serves a solve with and without standardisation.
    eigenvalues, eigenvectors = scipy.linalg.eigh(covariance, driver="evd", overwrite_a=standardize)
    eigenvalues = np.clip(eigenvalues, 0.0, None)  # rounding can leave the smallest below 0
    projected = eigenvectors.T @ cross  # (D, C): V^T X^T Y
    shrunk = np.concatenate([projected / (eigenvalues + value)[:, None] for value in values], 1)
    solutions = eigenvectors @ shrunk  # (D, L * C): every W^T in one product
    num = len(values)
    weights = torch.from_numpy(solutions.T.reshape(num, num_classes, -1).copy())
    # The centred targets' mean is the bias in the centred (and scaled) space.
    biases = torch.from_numpy(stats.target_mean).expand(num, -1)
    mean64 = torch.from_numpy(mean)
    std64 = torch.ones_like(mean64) if std is None else torch.from_numpy(std)
    folded = fold_standardization(weights, biases, mean64, std64)
    return RidgeFit(
        l2=values,
        weights=folded["weight"].float(),
        biases=folded["bias"].float(),
        mean=None if std is None else mean64.float(),
        std=None if std is None else std64.float(),
    )


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature), in float64."""
    scaled = logits.double() / temperature
    return float(torch.nn.functional.cross_entropy(scaled, labels))


def fit_temperature(
    logits: torch.Tensor, labels: torch.Tensor, low: float = 1e-3, high: float = 1e3
) -> float:
    """The temperature T in [low, high] minimising the NLL of softmax(logits / T) on `labels`.

    The NLL is convex in beta = 1 / T (a log-sum-exp of terms linear in beta, minus a linear
    term), so its derivative, mean(E_softmax[logit] - logit of the label), rises with beta and
    its zero is found by bisection on log beta. Outside [low, high] the nearer end is returned:
    a split the logits separate perfectly drives T towards 0.
    """
    logits = logits.double()

    def slope(beta: float) -> float:
        probabilities = torch.softmax(logits * beta, dim=1)
        expected = (probabilities * logits).sum(1)
        return float((expected - logits.gather(1, labels[:, None]).squeeze(1)).mean())

    lo, hi = math.log(1.0 / high), math.log(1.0 / low)
    if slope(math.exp(lo)) >= 0:
        return high
    if slope(math.exp(hi)) <= 0:
        return low
    for _ in range(60):
        middle = (lo + hi) / 2
        if slope(math.exp(middle)) < 0:
            lo = middle
        else:
            hi = middle
    return 1.0 / math.exp((lo + hi) / 2)
