"""Stitch the frozen backbone and the trained head back together and classify images and video.

Python API (``python -m live`` runs it on cameras, videos and folders; ``python -m live.export``
writes it as a torch.export program):

    live.load(model, device="auto", weights=None) -> Predictor
        Rebuild backbone and head from a checkpoint (or the folder head.fit saved into).
    Predictor.predict(images, topk=5)
        PIL images, RGB NumPy arrays or image paths (one, or a list) -> per image the top-k
        classes as ``{"index", "wnid", "name", "prob"}``, preprocessed exactly as extract does.
    Predictor.predict_bgr(frames, topk=5)
        The same for OpenCV's BGR frames.
    Predictor.export(out, torchscript=False) -> list[Path]
        The model as a ``torch.export`` program (.pt2) with its preprocessing and classes.
    live.UserError
        An expected problem; its message is the line the commands print.

Example::

    import live

    model = live.load("model")
    print(model.predict("photo.jpg", topk=3)[0]["name"])
"""

from extract.errors import UserError
from live.predictor import Predictor, load

__all__ = ["load", "Predictor", "UserError"]
