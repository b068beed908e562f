"""live.export: a torch.export program that runs without this project and gives what `predict`
gives, carrying its preprocessing and classes; TorchScript only when asked for."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import alexnet

import live
from conftest import pattern_image
from extract import backbone
from extract.errors import UserError
from extract.preprocess import Preprocess, normalize
from live import export, exporter

# Runs in a fresh interpreter: torch, torchvision and PIL only. It prints the probabilities of
# the images named on its command line, preprocessed by torchvision's own transforms from the
# parameters stored in the program, and which modules of this project it imported (none).
SERVE = """
import json, sys
import torch
from PIL import Image
from torchvision import transforms

extra = {"live.json": ""}
program = torch.export.load(sys.argv[1], extra_files=extra)
described = json.loads(extra["live.json"])
p = described["preprocess"]
transform = transforms.Compose([
    transforms.Resize(p["resize_size"], transforms.InterpolationMode(p["interpolation"]),
                      antialias=p["antialias"]),
    transforms.CenterCrop(p["crop_size"]),
    transforms.ToTensor(),
    transforms.Normalize(p["mean"], p["std"]),
])
images = torch.stack([transform(Image.open(path).convert("RGB")) for path in sys.argv[2:]])
with torch.no_grad():
    logits = torch.cat([program.module()(images[:1]), program.module()(images[1:])])
print(json.dumps({
    "probabilities": torch.softmax(logits, dim=1).tolist(),
    "names": described["names"],
    "project": sorted({m.split(".")[0] for m in sys.modules} & {"extract", "head", "live"}),
}))
"""


def write_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    paths = [folder / f"image_{index}.png" for index in range(count)]
    for index, path in enumerate(paths):
        pattern_image(index % 3, 300 + index).save(path)
    return paths


def probabilities(model, images) -> np.ndarray:
    """`predict`'s answer for every class, by class index."""
    table = np.zeros((len(images), len(model.names)))
    for row, top in enumerate(model.predict(images, topk=len(model.names))):
        for entry in top:
            table[row, entry["index"]] = entry["prob"]
    return table


def test_program_gives_the_probabilities_of_predict_in_a_process_without_the_project(
    tmp_path, model_dir
):
    images = write_images(tmp_path / "images", 4)
    with warnings.catch_warnings():  # here, not around the fixtures: they extract JPEG files
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        model = live.load(model_dir, device="cpu")
        written = model.export(tmp_path / "live.pt2")
        expected = probabilities(model, images)
    assert written[:2] == [tmp_path / "live.pt2", tmp_path / "live.json"]
    assert not (tmp_path / "live.pt").exists(), "TorchScript only when asked for"

    served = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::DeprecationWarning",
            "-W",
            "error::FutureWarning",
            "-c",
            SERVE,
            str(tmp_path / "live.pt2"),
            *map(str, images),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert served.returncode == 0, served.stderr
    result = json.loads(served.stdout)
    assert result["project"] == []
    assert result["names"] == ["goldfish", "European fire salamander", "bullfrog"]
    # fp32 on the CPU; torchvision's PIL path rounds the normalisation differently.
    np.testing.assert_allclose(result["probabilities"], expected, rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "live.json").read_text())["wnids"] == model.wnids


def test_torchscript_only_when_asked_and_it_computes_what_the_program_computes(
    tmp_path, model_dir, capsys
):
    out = tmp_path / "live.pt2"
    with pytest.warns(FutureWarning):  # torch deprecates TorchScript; asked for, it says so
        assert export.main(["--model", str(model_dir), "--out", str(out), "--torchscript"]) == 0
    assert "live.pt2" in capsys.readouterr().out
    extra = {exporter.METADATA: ""}
    with pytest.warns(FutureWarning):  # torch deprecates TorchScript
        scripted = torch.jit.load(str(tmp_path / "live.pt"), _extra_files=extra)
    described = json.loads(extra[exporter.METADATA])
    params = Preprocess.from_json(json.dumps(described["preprocess"]))
    assert params == live.load(model_dir, device="cpu").params
    program = torch.export.load(out).module()
    pixels = torch.randint(0, 256, (3, 3, params.crop_size, params.crop_size), dtype=torch.uint8)
    images = normalize(pixels, params)
    with torch.no_grad():
        torch.testing.assert_close(scripted(images), program(images), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not exporter.onnx_available(), reason="onnx and onnxscript not installed")
def test_onnx_file_computes_what_the_program_computes_for_any_batch(tmp_path, model_dir):
    import onnx
    from onnx.reference import ReferenceEvaluator

    written = live.load(model_dir, device="cpu").export(tmp_path / "live.pt2")
    assert tmp_path / "live.onnx" in written
    graph = onnx.load(str(tmp_path / "live.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param, "a named, dynamic batch"
    program = torch.export.load(tmp_path / "live.pt2").module()
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    (logits,) = ReferenceEvaluator(str(tmp_path / "live.onnx")).run(
        None, {"images": images.numpy()}
    )
    with torch.no_grad():
        np.testing.assert_allclose(logits, program(images).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_model_on_cuda_predicts_as_on_the_cpu_and_exports_a_cpu_program(tmp_path, model_dir):
    images = write_images(tmp_path / "images", 3)
    on_cuda = live.load(model_dir, device="cuda")
    on_cpu = live.load(model_dir, device="cpu")
    expected = probabilities(on_cpu, images)
    # cuDNN may run the convolutions in TF32 (10-bit mantissa): 1e-3 on probabilities.
    np.testing.assert_allclose(probabilities(on_cuda, images), expected, rtol=0, atol=1e-3)
    on_cuda.export(tmp_path / "live.pt2")
    assert next(on_cuda.classifier.network.parameters()).is_cuda, "the model in use stays"
    program = torch.export.load(tmp_path / "live.pt2").module()
    assert all(not tensor.is_cuda for tensor in program.state_dict().values())


def test_export_refuses_an_out_name_that_the_side_car_files_would_take(tmp_path, model_dir):
    with pytest.raises(UserError, match=r"\.pt2"):
        export.main(["--model", str(model_dir), "--out", str(tmp_path / "live.json")])


def test_imagenet_export_is_the_1000_way_network_with_its_classes(
    tmp_path, torch_home, weights_file
):
    """`python -m live.export --imagenet`: torchvision's AlexNet with the weights the hub cache
    holds, and its 1000 ImageNet names; CPU, fp32, within 1e-4."""
    out = tmp_path / "imagenet.pt2"
    assert export.main(["--imagenet", "--out", str(out)]) == 0
    described = json.loads(out.with_suffix(".json").read_text())
    assert described["names"] == backbone.categories("alexnet", "imagenet")
    reference = alexnet(weights=None).eval()
    reference.load_state_dict(torch.load(weights_file, weights_only=True))
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            torch.export.load(out).module()(images), reference(images), rtol=1e-4, atol=1e-4
        )
