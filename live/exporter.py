"""The stitched model as files that run without this project: a ``torch.export`` program first.

The program (``FILE.pt2``, written by ``torch.export.save``) takes normalized float32 images
(N, 3, crop, crop), any batch size, and returns logits (N, C). What is needed to feed it and name
its outputs travels inside it as the extra file ``live.json`` (read back with
``torch.export.load(path, extra_files={"live.json": ""})``) and beside it as ``FILE.json``: the
preprocessing parameters (`extract.preprocess.Preprocess`), the class wnids and names, and the
backbone weights' SHA-256.

From the same program, ``FILE.onnx`` (its weights in ``FILE.onnx.data``) is written by torch's
current ONNX exporter when the onnx and onnxscript packages are installed. TorchScript
(``FILE.pt``), which torch has deprecated in favour of ``torch.export``, is written only when
asked for.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import torch

from extract.errors import UserError
from live.model import Classifier

METADATA = "live.json"
SUFFIX = ".pt2"


def metadata(classifier: Classifier) -> dict:
    """What a program's user needs besides the program: its input, its output, the
    preprocessing, the classes and the backbone weights' digest."""
    crop = classifier.params.crop_size
    return {
        "input": f"normalized float32 RGB images (N, 3, {crop}, {crop}); see preprocess",
        "output": "logits (N, C); softmax gives the probabilities",
        "preprocess": json.loads(classifier.params.to_json()),
        "wnids": classifier.wnids,
        "names": classifier.names,
        "weights_sha256": classifier.weights_sha256,
    }


def onnx_available() -> bool:
    """torch's ONNX exporter (``dynamo=True``) needs both packages."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxscript"))


def export(classifier: Classifier, out: Path, torchscript: bool = False) -> list[Path]:
    """Write the program, its side-car JSON, the ONNX file (when onnx is installed) and, if
    asked, the TorchScript file; returns the files written."""
    if out.suffix != SUFFIX:
        raise UserError(
            f"--out {out}: name the program file {SUFFIX}; .json, .onnx and .pt are "
            f"written next to it"
        )
    # A float32 copy on the CPU in the default layout: the program's weights are saved as
    # plain tensors, and the classifier in use keeps its device, dtype and channels_last.
    # eval() again: a deep copy of torchvision's feature-extractor graph comes back in
    # training mode, its dropout active.
    network = (
        copy.deepcopy(classifier.network)
        .eval()
        .to("cpu", torch.float32, memory_format=torch.contiguous_format)
    )
    crop = classifier.params.crop_size
    example = torch.zeros(2, 3, crop, crop)  # two: an example batch of one fixes the batch at 1
    batch = torch.export.Dim("batch", min=1)
    described = json.dumps(metadata(classifier), indent=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.export.export(network, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, out, extra_files={METADATA: described})
    sidecar = out.with_suffix(".json")
    sidecar.write_text(described + "\n")
    written = [out, sidecar]
    if onnx_available():
        onnx_path = out.with_suffix(".onnx")
        torch.onnx.export(
            program,
            f=onnx_path,
            input_names=["images"],
            output_names=["logits"],
            dynamo=True,
            verbose=False,
        )
        # The weights go to FILE.onnx.data beside it (protobuf files stop at 2 GB).
        weights = onnx_path.with_name(onnx_path.name + ".data")
        written.extend([onnx_path, weights] if weights.exists() else [onnx_path])
    if torchscript:
        script_path = out.with_suffix(".pt")
        with torch.no_grad():
            traced = torch.jit.trace(network, example)
        traced.save(str(script_path), _extra_files={METADATA: described})
        written.append(script_path)
    return written
