"""Train a new classification layer on features cached by extract, and measure it.

Python API (``python -m head.train`` and ``python -m head.evaluate`` are thin wrappers):

    head.fit(features, save, **settings) -> dict
        Train with Adam on the feature file, saving last.pt, best.pt, history and plots in
        `save`; the settings and their defaults are those of ``python -m head.train``
        (``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``init``, ``standardize``,
        ``flip``, ``resume``, ...). Returns the final checkpoint's contents.
    head.report(model, features, split="val", out=None) -> dict
        Top-1, top-5, mean per-class accuracy and calibration error on one split: what
        ``python -m head.evaluate`` writes to report.json.
    head.sweep(features, save, lr=..., weight_decay=..., standardize="both", knn=None,
               ridge=False, holdout=None, save_all=False, **settings) -> list[dict]
        Train a grid of heads at once (``python -m head.sweep``), save the best as best.pt
        with sweep.csv and sweep.png; returns one dict per head, the winner's ``best`` True.
    head.UserError
        An expected problem; its message is the line the commands print.

Example::

    import head

    state = head.fit("features.h5", "model", epochs=20, standardize=True)
    print(state["best_accuracy"], head.report("model", "features.h5")["top5"])
"""

from extract.errors import UserError
from head.api import fit, report, sweep

__all__ = ["fit", "report", "sweep", "UserError"]
