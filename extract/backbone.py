"""The frozen backbone: any torchvision classification network, its weights, the node its
features are read at, and the preprocessing that goes with the weights.

This is the one module that knows about architectures, and it keeps no table of its own: names,
builders, weights, their preprocessing and their class lists all come from torchvision's registry
(`list_models`, `get_model`, `get_model_weights`, each weights record's `transforms()` and `meta`).

Weights, named by the `--weights` argument of every command:

* ``imagenet``: the architecture's ``DEFAULT`` weights, through torchvision's own loader, so a
  torch hub cache (``$TORCH_HOME/hub/checkpoints/<torchvision's file name>``) or a download
  serves them; a member name of the architecture's weights (``IMAGENET1K_V2``, ...) picks others;
* ``random``: the architecture initialised from a fixed seed, reproducible, with no file at hand;
* a path: a ``state_dict`` file of that architecture, read with ``weights_only=True``.

The preprocessing is that of the weights' own ``transforms()``; for ``random`` and a file, that of
the architecture's ``DEFAULT`` weights. Each set of weights is identified by the SHA-256 of its
tensors (`state_dict_sha256`), which does not depend on how the file was written; extraction
records it and `head` and `live` check it.

The node (``--node``) is where the features are read. By default it is the input of the network's
last ``nn.Linear`` (dropout skipped, it does nothing in eval mode): the features its ImageNet
classifier sees, AlexNet's fc7 (``classifier.5``). Any node of torchvision's graph of the network
can be named (`node_names` lists them; a module's name such as ``layer3`` stands for the last
node inside it, as torchvision's `create_feature_extractor` reads it); what it gives becomes one
vector per image:

* ``(N, D)``: kept as it is;
* ``(N, C, H, W)``: averaged over H and W (Swin's stages are ``(N, H, W, C)``: averaged over H, W);
* ``(N, L, D)``, a transformer's token sequence: averaged over the L tokens;
* anything else is refused.

torchvision is imported inside the functions, not with this module: it adds some 170 MB to a
process, and `head` training, which imports this module, never builds a network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from extract.errors import UserError, first_line

if TYPE_CHECKING:
    from torchvision.models import Weights

    from extract.preprocess import Preprocess

DEFAULT_BACKBONE = "alexnet"
IMAGENET = "imagenet"
RANDOM = "random"
RANDOM_SEED = 0
# --init names of a backbone's own ImageNet classifier besides "classifier", and whose they are.
CLASSIFIER_ALIASES = {"fc8": ("alexnet", "AlexNet")}
OUTPUT = "features"  # the key of the node's output in the extractor's graph


@dataclasses.dataclass
class Backbone:
    """A built backbone: the network, its cut at the node, and what identifies both."""

    name: str
    weights: str  # as named: imagenet, a weights member name, random, or a file path
    node: str
    network: nn.Module  # the whole classifier network, eval mode, on the CPU
    extractor: nn.Module  # normalized images (N, 3, crop, crop) -> features (N, D)
    preprocess: Preprocess
    weights_sha256: str
    feature_dim: int

    def provenance(self) -> dict[str, str]:
        """What a feature file and a checkpoint record to rebuild this very backbone."""
        return {
            "backbone": self.name,
            "node": self.node,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "preprocess": self.preprocess.to_json(),
        }


class FeatureExtractor(nn.Module):
    """The network cut at a node by torchvision's `create_feature_extractor`, its output averaged
    over `pool_dims` (the spatial or token dimensions) to one vector per image."""

    def __init__(self, graph: nn.Module, pool_dims: tuple[int, ...]):
        super().__init__()
        self.graph = graph
        self.pool_dims = pool_dims

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.graph(images)[OUTPUT]
        return features.mean(self.pool_dims) if self.pool_dims else features


def architectures() -> list[str]:
    """Every classification network torchvision ships, by the name `get_model` takes."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def check_architecture(name: str) -> None:
    if name not in architectures():
        raise UserError(
            f"--backbone {name}: not a torchvision classification network "
            f"(python -m extract --list-backbones prints the {len(architectures())} names)"
        )


def weights_record(name: str, weights: str) -> Weights:
    """torchvision's weights record for `weights`: the named one, or the architecture's DEFAULT
    for ``random`` and a file (their preprocessing and class list are those of the default)."""
    from torchvision.models import get_model_weights

    check_architecture(name)
    members = get_model_weights(name)
    if weights in (IMAGENET, RANDOM) or weights not in members.__members__:
        return members.DEFAULT
    return members[weights]


def is_torchvision_weights(name: str, weights: str) -> bool:
    """Whether `weights` names pretrained weights of torchvision rather than random or a file."""
    from torchvision.models import get_model_weights

    check_architecture(name)
    return weights == IMAGENET or weights in get_model_weights(name).__members__


def preprocess_of(record: Weights) -> Preprocess:
    """The evaluation preprocessing of a weights record, read from its own ``transforms()``."""
    from extract.preprocess import Preprocess

    transform = record.transforms()
    return Preprocess(
        resize_size=int(transform.resize_size[0]),
        crop_size=int(transform.crop_size[0]),
        mean=tuple(float(x) for x in transform.mean),
        std=tuple(float(x) for x in transform.std),
        interpolation=transform.interpolation.value,
        antialias=bool(transform.antialias),
    )


def preprocess_for(name: str, weights: str) -> Preprocess:
    """The preprocessing of `name` with `weights`, known without building the network."""
    return preprocess_of(weights_record(name, weights))


def default_preprocess() -> Preprocess:
    """The preprocessing of the default backbone's ImageNet weights (AlexNet's: shorter side
    to 256, bilinear with antialiasing, center crop 224, ImageNet mean and std)."""
    return preprocess_for(DEFAULT_BACKBONE, IMAGENET)


def cache_file(name: str, weights: str = IMAGENET) -> Path:
    """Where torchvision looks for (and downloads) the pretrained weights."""
    record = weights_record(name, weights)
    return Path(torch.hub.get_dir()) / "checkpoints" / record.url.rsplit("/", 1)[-1]


def load_network(name: str, weights: str) -> nn.Module:
    """Build the whole classifier network with the named weights, in eval mode, on the CPU."""
    from torchvision.models import get_model, get_model_weights

    check_architecture(name)
    with warnings.catch_warnings():
        # GoogLeNet and Inception warn that their default initialisation will change.
        warnings.simplefilter("ignore", FutureWarning)
        if is_torchvision_weights(name, weights):
            check_cached_weights(cache_file(name, weights))
            try:
                model = get_model(name, weights=weights_record(name, weights), progress=False)
            except (OSError, RuntimeError) as error:
                raise UserError(
                    f"pretrained {name} weights are not in {cache_file(name, weights)} and "
                    f"could not be downloaded ({type(error).__name__}); use --weights random "
                    f"or a weights file"
                ) from None
        elif weights == RANDOM:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_SEED)
                model = get_model(name, weights=None)
        else:
            if not Path(weights).is_file():
                known = ", ".join(get_model_weights(name).__members__)
                raise UserError(
                    f"--weights {weights}: no such file, and not imagenet, random or one of "
                    f"the {name} weights ({known})"
                )
            model = get_model(name, weights=None)
            state = read_state_dict(Path(weights), model.state_dict(), name)
            model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def check_cached_weights(cached: Path) -> None:
    """torchvision reads its cache with ``weights_only=False``; a file there is read safely
    first (memory-mapped: the tensors' bytes are not read), so one carrying pickled code is
    refused before torchvision unpickles it. A download is checked by its hash instead."""
    if not cached.is_file():
        return
    try:  # only zip files map (files saved before torch 1.6 are not)
        torch.load(cached, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(cached))
    except Exception as error:  # torch raises many types for foreign or damaged files
        raise UserError(f"{cached}: not a readable weights file ({first_line(error)})") from None


def read_state_dict(
    path: Path, expected: dict[str, torch.Tensor], name: str = DEFAULT_BACKBONE
) -> dict[str, torch.Tensor]:
    """Read a weights file safely and check its keys and shapes against `expected`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for foreign or damaged files
        raise UserError(f"{path}: not a readable weights file ({first_line(error)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state_dict (a dict of tensors)")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{path}: not a torchvision {name} state_dict "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise UserError(
                f"{path}: {key} has shape {tuple(state[key].shape)}, "
                f"{name} needs {tuple(tensor.shape)}"
            )
    return state


def state_dict_sha256(model: nn.Module) -> str:
    """A digest of the weights themselves: names, dtypes, shapes and bytes, in key order."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def node_names(model: nn.Module) -> list[str]:
    """Every node `--node` accepts, in the order the network computes them (eval mode)."""
    from torchvision.models.feature_extraction import get_graph_node_names

    return get_graph_node_names(model, suppress_diff_warning=True)[1]


def default_node(model: nn.Module, name: str) -> str:
    """The node computed just before the last ``nn.Linear``, dropout skipped: the input of the
    classifier (torchvision's classifiers end in a chain, so that node is what feeds it)."""
    modules = dict(model.named_modules())
    nodes = node_names(model.eval())
    linears = [i for i, node in enumerate(nodes) if isinstance(modules.get(node), nn.Linear)]
    if not linears:
        raise UserError(
            f"--backbone {name} has no Linear classifier to read the input of: name a node "
            f"with --node (--list-nodes prints them)"
        )
    position = linears[-1] - 1
    while isinstance(modules.get(nodes[position]), nn.modules.dropout._DropoutNd):
        position -= 1
    return nodes[position]


def imagenet_classifier(model: nn.Module) -> nn.Linear:
    """The network's last ``nn.Linear``: the pretrained classifier a new head replaces."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise UserError(f"{type(model).__name__} has no Linear classifier")
    return linears[-1]


def channels_last_stages(model: nn.Module) -> bool:
    """Swin keeps its stage outputs as (N, H, W, C); every other network as (N, C, H, W)."""
    from torchvision.models import SwinTransformer

    return isinstance(model, SwinTransformer)


def feature_extractor(
    model: nn.Module, name: str, node: str, crop_size: int
) -> tuple[FeatureExtractor, int]:
    """The network cut at `node`, pooled to vectors, and the length of those vectors; the node's
    shape is learnt from one blank image."""
    from torchvision.models.feature_extraction import create_feature_extractor

    known = node_names(model)
    if node not in known and not any(k.startswith(node + ".") for k in known):
        raise UserError(
            f"--node {node}: not a node of {name} (python -m extract --backbone {name} "
            f"--list-nodes prints its {len(known)} nodes)"
        )
    graph = create_feature_extractor(
        model, return_nodes={node: OUTPUT}, suppress_diff_warning=True
    ).eval()
    with torch.no_grad():
        output = graph(torch.zeros(1, 3, crop_size, crop_size))[OUTPUT]
    if not isinstance(output, torch.Tensor) or output.ndim not in (2, 3, 4):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise UserError(
            f"--node {node}: gives {shape}, not (N, D), (N, C, H, W) or (N, L, D) features"
        )
    if output.ndim == 4:
        pool_dims = (1, 2) if channels_last_stages(model) else (2, 3)
    else:
        pool_dims = (1,) if output.ndim == 3 else ()
    extractor = FeatureExtractor(graph, pool_dims).eval().requires_grad_(False)
    return extractor, int(output.mean(pool_dims).shape[1] if pool_dims else output.shape[1])


def build(
    name: str = DEFAULT_BACKBONE, weights: str = IMAGENET, node: str | None = None
) -> Backbone:
    """The backbone `name` with `weights`, cut at `node` (default: its classifier's input)."""
    network = load_network(name, weights)
    preprocess = preprocess_for(name, weights)
    node = node or default_node(network, name)
    extractor, feature_dim = feature_extractor(network, name, node, preprocess.crop_size)
    return Backbone(
        name=name,
        weights=weights,
        node=node,
        network=network,
        extractor=extractor,
        preprocess=preprocess,
        weights_sha256=state_dict_sha256(network),
        feature_dim=feature_dim,
    )


def categories(name: str, weights: str) -> list[str] | None:
    """The class names of the weights' own classifier (ImageNet's), or None when unnamed."""
    found = weights_record(name, weights).meta.get("categories")
    return list(found) if found else None
