"""python -m live.export: the stitched model as one TorchScript file, to serve without this repo.

The exported module takes normalized images (N, 3, crop, crop) and returns logits (N, C). What is
needed to feed it and name its outputs travels with it, as ``live.json`` inside the TorchScript
file (read with ``torch.jit.load(path, _extra_files={"live.json": ""})``) and as a side-car
``FILE.json``: the preprocessing parameters (`extract.preprocess.Preprocess`), the class wnids
and names, and the backbone weights' SHA-256. With the onnx package installed, ``FILE.onnx`` is
written as well.

Examples:
    python -m live.export --model build/demo/model --out build/demo/live.pt
    python -m live.export --imagenet --out alexnet_imagenet.pt
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import warnings
from pathlib import Path

import torch

from extract.errors import UserError, run_cli
from live import model
from live.model import Classifier

METADATA = "live.json"


def metadata(classifier: Classifier) -> dict:
    crop = classifier.params.crop_size
    return {
        "input": f"normalized float32 RGB images (N, 3, {crop}, {crop}); see preprocess",
        "output": "logits (N, C); softmax gives the probabilities",
        "preprocess": json.loads(classifier.params.to_json()),
        "wnids": classifier.wnids,
        "names": classifier.names,
        "weights_sha256": classifier.weights_sha256,
    }


def export(classifier: Classifier, out: Path) -> list[Path]:
    """Write the TorchScript file, its side-car JSON and, if onnx is installed, the ONNX file."""
    network = classifier.network.cpu()
    crop = classifier.params.crop_size
    example = torch.zeros(1, 3, crop, crop).to(memory_format=torch.channels_last)
    described = json.dumps(metadata(classifier), indent=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the contract asks for TorchScript
        traced = torch.jit.trace(network, example)
    traced.save(str(out), _extra_files={METADATA: described})
    sidecar = out.with_suffix(".json")
    sidecar.write_text(described + "\n")
    written = [out, sidecar]
    if importlib.util.find_spec("onnx") is not None:
        onnx_path = out.with_suffix(".onnx")
        torch.onnx.export(
            network,
            (example,),
            str(onnx_path),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
        written.append(onnx_path)
    return written


def load(path: Path) -> tuple[torch.jit.ScriptModule, dict]:
    """Read an exported model and its metadata back."""
    extra = {METADATA: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module.eval(), json.loads(extra[METADATA])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m live.export",
        description="Export backbone and head, stitched, as TorchScript (and ONNX when the onnx "
        "package is installed), with preprocessing parameters and class names alongside.",
        epilog=__doc__.split("Examples:\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", type=Path, help="checkpoint file or head.train's folder")
    what.add_argument("--imagenet", action="store_true", help="the 1000-way ImageNet network")
    parser.add_argument("--out", type=Path, required=True, help="TorchScript file to write (.pt)")
    parser.add_argument(
        "--weights",
        default=None,
        help="backbone weights (default: those recorded in the checkpoint)",
    )
    args = parser.parse_args(argv)
    if args.out.suffix in (".json", ".onnx"):
        raise UserError(
            f"--out {args.out}: name the TorchScript file (.pt); .json and .onnx "
            f"are written next to it"
        )
    if args.imagenet:
        classifier = model.imagenet(args.weights or "imagenet")
    else:
        classifier = model.from_checkpoint(args.model, args.weights)
    written = export(classifier, args.out)
    print("wrote " + ", ".join(str(path) for path in written))
    if len(written) == 2:
        print("onnx is not installed: TorchScript only (pip install onnx for an ONNX file too)")
    return 0


if __name__ == "__main__":
    run_cli(main)
