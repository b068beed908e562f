import h5py

from conftest import extract_features


def test_feature_file_has_the_contract_layout(tiny_imagenet, tmp_path):
    out = extract_features(tiny_imagenet, tmp_path / "f.h5")
    with h5py.File(out) as file:
        assert file["train/features"].shape == (12, 4096)
        assert file["val/features"].shape == (6, 4096)
        assert bool(file.attrs["complete"])
