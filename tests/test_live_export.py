"""live.export: the TorchScript file computes what the stitched model computes, and says how to
feed it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import video_frames
from extract.errors import UserError
from extract.preprocess import Preprocess, normalize
from live import export, model


def test_exported_model_gives_the_same_logits_and_carries_preprocessing_and_classes(
    tmp_path, model_dir, capsys
):
    assert export.main(["--model", str(model_dir), "--out", str(tmp_path / "live.pt")]) == 0
    assert "live.pt" in capsys.readouterr().out
    scripted, described = export.load(tmp_path / "live.pt")
    assert described == json.loads((tmp_path / "live.json").read_text())
    assert described["wnids"] == ["n01443537", "n01629819", "n01641577"]
    assert described["names"] == ["goldfish", "European fire salamander", "bullfrog"]
    params = Preprocess.from_json(json.dumps(described["preprocess"]))
    classifier = model.from_checkpoint(model_dir)
    assert params == classifier.params

    pixels = torch.stack([model.frame_pixels(frame, params) for frame in video_frames(3)])
    images = normalize(pixels, params)
    with torch.inference_mode():
        expected = classifier.network(images)
        for batch in (images, images[:1]):
            torch.testing.assert_close(
                scripted(batch), expected[: len(batch)], rtol=1e-5, atol=1e-5
            )
    np.testing.assert_allclose(
        classifier.probabilities(pixels[0]),
        torch.softmax(scripted(images[:1]), dim=1)[0].detach().numpy(),
        atol=1e-6,
    )


def test_export_refuses_an_out_name_that_the_side_car_files_would_take(tmp_path, model_dir):
    with pytest.raises(UserError, match="TorchScript"):
        export.main(["--model", str(model_dir), "--out", str(tmp_path / "live.json")])
