"""live from Python: a trained head stitched to its backbone, classifying the images a script holds.

Every image goes through `extract`'s own preprocessing: a file is decoded as extraction decodes
it (`extract.images.read_pixels`), a PIL image or an RGB array is converted and resized by
`extract.preprocess`, so `predict` on an image file gives what extraction and the head give for
it. OpenCV frames are BGR; they have their own call, `predict_bgr`, which converts them
explicitly (`live.model.frame_pixels`), so an RGB array is never taken for a BGR one.

`teach` adds a class from a few images on the spot and `forget` removes it (`live.teaching`);
`save` writes the head with its taught classes as an ordinary checkpoint, and their crops in
the layout `extract` reads, to extract and train on properly later.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from extract.backbone import DEFAULT_BACKBONE
from extract.device import DEFAULT_DEVICE
from extract.errors import UserError
from extract.images import failure_reason, read_pixels
from extract.precisions import LIVE_DEFAULT
from extract.preprocess import Preprocess, resize_crop, rgb_array_to_uint8, to_uint8
from head import checkpoint
from live import model as stitched
from live.model import Classifier, frame_pixels
from live.session import top_indices
from live.teaching import CROPS, MAX_NAME_LENGTH, TEACH_MAX, Lessons

BATCH = 32  # images through the network at once (32 normalized 224 x 224 images: 19 MB)
ImageInput = Image.Image | np.ndarray | str | os.PathLike


@dataclasses.dataclass
class Predictor:
    """The stitched classifier with `predict` for RGB images and `predict_bgr` for OpenCV frames,
    and `teach`, `forget` and `save` for classes taught on the spot."""

    classifier: Classifier
    lessons: Lessons

    @property
    def wnids(self) -> list[str | None]:
        """Class index -> wnid (or folder name), as the feature file lists them."""
        return self.classifier.wnids

    @property
    def names(self) -> list[str]:
        """Class index -> human-readable name."""
        return self.classifier.names

    @property
    def params(self) -> Preprocess:
        """The preprocessing the backbone's features were made with."""
        return self.classifier.params

    def predict(
        self, images: ImageInput | Sequence[ImageInput], topk: int = 5
    ) -> list[dict] | list[list[dict]]:
        """The `topk` most probable classes of each image, most probable first, as dicts
        ``{"index", "wnid", "name", "prob"}``.

        `images`: a PIL image (any mode), an H x W x 3 uint8 RGB NumPy array or an H x W
        uint8 gray one, an image file's path, or a list of them (or an N x H x W x 3 array).
        One image gives one list of dicts, several give one such list per image.
        """
        return self._classify(images, topk, self._rgb_pixels)

    def predict_bgr(
        self, frames: np.ndarray | Sequence[np.ndarray], topk: int = 5
    ) -> list[dict] | list[list[dict]]:
        """`predict` for OpenCV frames: H x W x 3 uint8 arrays in BGR order, as
        ``cv2.imread`` and ``cv2.VideoCapture.read`` give them."""
        return self._classify(frames, topk, lambda frame: frame_pixels(frame, self.params))

    def _classify(
        self, images, topk: int, pixels_of: Callable[[object], torch.Tensor]
    ) -> list[dict] | list[list[dict]]:
        """Preprocess, classify in batches and name the `topk` classes of each image."""
        if topk < 1:
            raise UserError(f"topk={topk}: must be >= 1")
        many, batch = as_batch(images)
        results = []
        for start in range(0, len(batch), BATCH):
            pixels = torch.stack([pixels_of(image) for image in batch[start : start + BATCH]])
            for row in self.classifier.batch_probabilities(pixels):
                best = top_indices(row, topk)
                results.append(
                    [
                        {
                            "index": int(index),
                            "wnid": self.wnids[index],
                            "name": self.names[index],
                            "prob": float(row[index]),
                        }
                        for index in best
                    ]
                )
        return results if many else results[0]

    def _rgb_pixels(self, image: ImageInput) -> torch.Tensor:
        """One RGB image of any accepted kind, resized and cropped: (3, crop, crop) uint8."""
        if isinstance(image, Image.Image):
            return to_uint8(image, self.params)
        if isinstance(image, np.ndarray):
            if image.dtype == np.uint8 and image.ndim == 2:  # gray: as a PIL "L" image converts
                image = np.repeat(image[:, :, None], 3, axis=2)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise UserError(
                    f"an image array must be H x W x 3 uint8 RGB or H x W uint8 gray, not "
                    f"{image.dtype} {'x'.join(map(str, image.shape))}"
                )
            # np.asarray(PIL image) is read-only, which torch.from_numpy warns about.
            return rgb_array_to_uint8(np.require(image, requirements="CW"), self.params)
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            try:
                return resize_crop(read_pixels(path), self.params)
            except Exception as error:  # every decoder error is a property of the file
                raise UserError(f"{path}: unreadable image, {failure_reason(error)}") from None
        raise UserError(
            f"cannot classify a {type(image).__name__}: give a PIL image, an RGB array or a path"
        )

    def teach(
        self, name: str, images: ImageInput | Sequence[ImageInput], *, bgr: bool = False
    ) -> int:
        """Add `images` (as `predict` takes them, or OpenCV frames with ``bgr=True``) to the
        taught class `name`, creating it if new; at most teach_max examples are kept, the oldest
        dropped. The head is refitted and the next `predict` uses it. Returns how many
        examples `name` now has."""
        self.lessons.check_name(name)  # before the network's work
        _, batch = as_batch(images)
        if not batch:
            raise UserError(f"class {name!r}: no images to teach it with")
        pixels = torch.stack(
            [
                frame_pixels(image, self.params) if bgr else self._rgb_pixels(image)
                for image in batch
            ]
        )
        features = torch.cat(
            [
                self.classifier.batch_features(pixels[start : start + BATCH])
                for start in range(0, len(pixels), BATCH)
            ]
        )
        count = self.lessons.add(name, features, pixels)
        self._refit()
        return count

    def forget(self, name: str) -> None:
        """Remove the taught class `name` (UserError if it is not one) and refit."""
        self.lessons.remove(name)
        self._refit()

    @property
    def taught(self) -> dict[str, int]:
        """Taught class name -> the number of examples held for it."""
        return {name: len(lesson.features) for name, lesson in self.lessons.taught.items()}

    def save(self, folder: str | os.PathLike) -> Path:
        """Write folder/best.pt, an ordinary checkpoint of the head with its taught classes
        (loadable by live, live.export and head.evaluate), and the taught classes' crops under
        folder/crops/<class>/NNNN.png, which ``python -m extract --data folder/crops`` reads.
        Returns the checkpoint's path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / checkpoint.BEST
        checkpoint.save(self.lessons.checkpoint(), path)
        self.lessons.write_crops(folder / CROPS)
        return path

    def _refit(self) -> None:
        weight, bias = self.lessons.head()
        self.classifier.replace_head(
            stitched.linear(weight, bias), self.lessons.all_wnids, self.lessons.all_names
        )

    def export(self, out: str | os.PathLike, torchscript: bool = False) -> list[Path]:
        """Write the stitched network as a ``torch.export`` program (`out`, a .pt2 file) with
        its preprocessing and classes, as ``python -m live.export`` does; see `live.exporter`.
        Returns the files written."""
        from live import exporter

        return exporter.export(self.classifier, Path(out), torchscript=torchscript)


def as_batch(images) -> tuple[bool, list]:
    """Whether `images` are several (a list, a tuple, an N x H x W x 3 array), and the list."""
    many = isinstance(images, (list, tuple)) or (
        isinstance(images, np.ndarray) and images.ndim == 4
    )
    return many, list(images) if many else [images]


def load(
    model: str | os.PathLike | None,
    device: str = DEFAULT_DEVICE,
    weights: str | os.PathLike | None = None,
    precision: str = LIVE_DEFAULT,
    *,
    backbone: str | None = None,
    imagenet: bool = False,
    teach_max: int = TEACH_MAX,
    max_name_length: int = MAX_NAME_LENGTH,
) -> Predictor:
    """Rebuild the backbone and the head from a checkpoint (a file, or the folder `head.fit`
    saved into: its best.pt), ready to `predict` and to `teach`.

    `weights` are the backbone's, as ``--weights`` of ``python -m live``: by default those the
    checkpoint records; weights kept elsewhere (a state_dict file) are accepted when their
    SHA-256 is the recorded one. `device` is "auto", "cpu" or "cuda"; `precision` "fp32" or
    "bf16".

    `model` None: no trained head, only the classes taught from then on, on the `backbone`
    (default alexnet) with `weights` (default imagenet); with ``imagenet=True``, the backbone's
    own ImageNet classes, as ``python -m live --imagenet --backbone``. `teach_max`: the most
    examples kept per taught class; `max_name_length`: the longest name a taught class may have.
    """
    weights = None if weights is None else os.fspath(weights)
    if model is not None and (imagenet or backbone is not None):
        raise UserError("give a model, or imagenet/backbone without one, not both")
    if model is None:
        architecture = backbone or DEFAULT_BACKBONE
        build = stitched.imagenet if imagenet else stitched.untrained
        classifier = build(
            weights=weights or "imagenet",
            device=device,
            precision=precision,
            architecture=architecture,
        )
        head = classifier.network.head
        weight, bias = head.weight.detach().float().cpu(), head.bias.detach().float().cpu()
        replay = None
    else:
        state = checkpoint.load(Path(model))
        classifier = stitched.from_state(state, Path(model), weights, device, precision)
        weight, bias = state.weight, state.bias
        replay = state.replay_rows()
    empty = torch.zeros(0, weight.shape[1]), torch.zeros(0, dtype=torch.long)
    replay_features, replay_labels = replay or empty
    lessons = Lessons(
        weight=weight,
        bias=bias,
        wnids=list(classifier.wnids),
        names=list(classifier.names),
        provenance=classifier.provenance,
        replay_features=replay_features,
        replay_labels=replay_labels,
        teach_max=teach_max,
        max_name_length=max_name_length,
    )
    return Predictor(classifier, lessons)
