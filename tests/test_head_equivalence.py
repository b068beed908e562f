"""Caching changes nothing but time: the head trained on cached fc7 equals the seed's way.

The seed's way is written here independently of `extract` and `head`: torchvision's AlexNet with
its last layer replaced, frozen and in eval mode, fed images preprocessed by torchvision's own
transforms, the whole network run on every batch of every epoch, Adam on CrossEntropyLoss of the
logits. Both runs use the same initial weights, the same sample order and the same seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.models import alexnet

from conftest import WNIDS, extract_features
from extract.preprocess import IMAGENET_MEAN, IMAGENET_STD
from head import features
from head.training import Settings, train

SEED = 3
EPOCHS = 2
BATCH = 5
LR = 0.001


def seed_training(data: Path, weights_file: Path) -> nn.Linear:
    """Train the new last layer the seed's way: images through the frozen network per batch."""
    model = alexnet(weights=None)
    model.load_state_dict(torch.load(weights_file, weights_only=True))
    model.requires_grad_(False)
    torch.manual_seed(SEED)
    model.classifier[6] = nn.Linear(4096, len(WNIDS))
    model.eval()
    preprocess = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    paths, labels = [], []
    for label, wnid in enumerate(sorted(WNIDS)):
        for path in sorted((data / "train" / wnid / "images").iterdir()):
            paths.append(path)
            labels.append(label)
    images = torch.stack([preprocess(Image.open(path).convert("RGB")) for path in paths])
    labels = torch.tensor(labels)
    optimizer = torch.optim.Adam(model.classifier[6].parameters(), lr=LR)
    loss_function = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        order = torch.randperm(len(paths), generator=generator)
        for start in range(0, len(paths), BATCH):
            rows = order[start : start + BATCH]
            loss = loss_function(model(images[rows]), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.classifier[6]


def test_head_trained_on_cached_features_equals_the_seed_training(
    tiny_imagenet, tmp_path, weights_file
):
    cached = extract_features(
        tiny_imagenet,
        tmp_path / "f32.h5",
        store_dtype="float32",
        precision="fp32",
        weights=str(weights_file),
    )
    data = features.load(cached, report=lambda line: None)
    settings = Settings(epochs=EPOCHS, batch_size=BATCH, lr=LR, seed=SEED, progress=False)
    state = train(data, tmp_path / "model", settings, torch.device("cpu"), report=lambda line: None)

    reference = seed_training(tiny_imagenet, weights_file)
    torch.testing.assert_close(state.weight, reference.weight.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(state.bias, reference.bias.detach(), rtol=0, atol=1e-5)
    # Not vacuous: the weights moved by many times the tolerance.
    initial = torch.load(tmp_path / "model" / "last.pt", weights_only=True)["state_dict"]
    torch.manual_seed(SEED)
    start = nn.Linear(4096, len(WNIDS))
    assert (initial["weight"] - start.weight.detach()).abs().max() > 100 * 1e-5
