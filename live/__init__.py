"""Stitch the frozen backbone and the trained head back together and classify images and video.

Python API (``python -m live`` runs it on cameras, videos and folders; ``python -m live.export``
writes it as a torch.export program; ``python -m live.serve`` serves it to a browser's camera,
see `live.serve`):

    live.load(model, device="auto", weights=None, precision="fp32", *, backbone=None,
              imagenet=False, teach_max=50, max_name_length=40) -> Predictor
        Rebuild backbone and head from a checkpoint (or the folder head.fit saved into);
        model None: no trained head, only classes taught from then on (or, imagenet=True,
        the backbone's own ImageNet classes).
    Predictor.predict(images, topk=5)
        PIL images, RGB NumPy arrays or image paths (one, or a list) -> per image the top-k
        classes as ``{"index", "wnid", "name", "prob"}``, preprocessed exactly as extract does.
    Predictor.predict_bgr(frames, topk=5)
        The same for OpenCV's BGR frames.
    Predictor.teach(name, images, *, bgr=False) -> int
        Add a class from a few images (at most teach_max kept, the oldest dropped), or more
        images to it; the head is refitted at once. Returns the examples `name` has.
    Predictor.forget(name), Predictor.taught -> {name: examples}
        Remove a taught class; the taught classes.
    Predictor.save(folder) -> Path
        folder/best.pt with the taught classes, their crops in folder/crops/<class>/.
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
