"""Train a new classification layer on features cached by extract, and measure it.

Python API (``python -m head.train`` and ``python -m head.evaluate`` are thin wrappers):

    head.fit(features, save, *, epochs=50, batch_size=100, lr=0.001, ...) -> FitResult
        Train with Adam on the feature file, saving last.pt, best.pt, history and plots in
        `save`; the keywords and their defaults are the options of ``python -m head.train``
        (``weight_decay``, ``init``, ``standardize``, ``flip``, ``device``, ``resume``, ...;
        ``help(head.fit)`` lists them all). Returns a `FitResult`: best epoch and top-1,
        paths, history; the whole last checkpoint is its ``checkpoint``.
    head.report(model, features, split="val", out=None) -> dict
        Top-1, top-5, mean per-class accuracy and calibration error on one split: what
        ``python -m head.evaluate`` writes to report.json. Like the command, it writes the
        reports into `out`, by default the model's folder.
    head.sweep(features, save, lr=..., weight_decay=..., standardize="both", knn=None,
               ridge=False, holdout=None, save_all=False, epochs=50, ...) -> list[dict]
        Train a grid of heads at once (``python -m head.sweep``), save the best as best.pt
        with sweep.csv and sweep.png; returns one dict per head, the winner's ``best`` True.
    head.UserError
        An expected problem; its message is the line the commands print.

Example::

    import head

    result = head.fit("features.h5", "model", epochs=20, standardize=True)
    print(result.best_top1, head.report("model", "features.h5")["top5"])
"""

from extract.errors import UserError
from head.api import fit, report, sweep

__all__ = ["fit", "report", "sweep", "UserError"]
