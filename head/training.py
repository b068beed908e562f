"""The training loop over cached features: shuffle, batch, step, measure, checkpoint.

One epoch draws a permutation (and, with flipped features, a plain-or-flipped choice per image)
from a `torch.Generator` seeded with `--seed`, indexes the in-memory feature tensor with it (or,
streamed, draws the block order and the order within each buffer fill: `features.stream_batches`),
casts each batch to float32 and takes an Adam step on the cross-entropy of the logits. The
generator's state is saved in every checkpoint, so a resumed run draws exactly what an
uninterrupted one would have.

The step needs no autograd: for logits = X W^T + b and the mean cross-entropy over a batch of
B rows, dL/dlogits = (softmax(logits) - onehot(labels)) / B, dW = G^T X and db = sum(G), two
matrix products (`closed_form_step`). On CUDA, with the features in memory, the epoch's order
is copied to the device once and the steps are replayed from a CUDA graph (`EpochGraph`): a
step is a dozen tiny kernels, and launching them one by one from Python took longer than
running them. The eager loop stays for the CPU, for streamed features, and as the reference the
graphed one is tested against.

Validation is measured on the exported layer (standardisation folded in, applied to the raw
features), so `best_accuracy` is what `head.evaluate` recomputes from `best.pt`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from extract.errors import UserError, first_line
from head import checkpoint, history
from head.adam import Adam
from head.features import (
    FeatureSet,
    SplitTensors,
    StreamedSplit,
    replay_set,
    standardization,
    stream_batches,
)
from head.model import (
    fold_standardization,
    initial_head,
    pretrained_classifier_head,
    unfold_standardization,
)

EVAL_BATCH = 1024  # rows cast to float32 at a time while scoring: 16 MB, as fast as more
MAX_STEPS_PER_GRAPH = 32  # steps captured in one CUDA graph (a divisor of the epoch's steps)
INITS = ("random", "classifier", "fc8")  # fc8: AlexNet's name for its classifier
PRETRAINED_INITS = ("classifier", "fc8")
# Settings a resumed run must share with the run it continues (--epochs may grow).
SAME_ON_RESUME = (
    "batch_size",
    "lr",
    "weight_decay",
    "seed",
    "init",
    "standardize",
    "flip",
    "precision",
)


@dataclasses.dataclass
class Settings:
    """The hyper-parameters; the defaults are the seed's recipe."""

    epochs: int = 50
    batch_size: int = 100
    lr: float = 0.001
    weight_decay: float = 0.0
    seed: int = 0
    init: str = "random"
    standardize: bool = False
    flip: bool = False
    precision: str = "fp32"  # of the training matmuls; the weights and Adam stay float32
    cuda_graphs: bool = True  # replay the steps from CUDA graphs where possible (same results)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def recorded(self) -> dict:
        return {key: getattr(self, key) for key in ("epochs", *SAME_ON_RESUME)}


@dataclasses.dataclass
class Scores:
    loss: float
    top1: float  # percent
    top5: float  # percent


@dataclasses.dataclass
class Run:
    """Everything that changes while training; `to_checkpoint` turns it into the saved dict."""

    head: nn.Linear  # trained in standardised space when `mean` is set
    optimizer: Adam
    generator: torch.Generator
    mean: torch.Tensor | None
    std: torch.Tensor | None
    history: dict[str, list] = dataclasses.field(
        default_factory=lambda: {key: [] for key in history.LISTS}
    )
    epoch: int = 0
    best_epoch: int = -1
    best_accuracy: float = 0.0
    best_score: float = math.nan
    graph: EpochGraph | None = None  # built at the first graphed epoch, replayed by the rest
    replay: dict[str, torch.Tensor] | None = None  # checkpoint.replay_entry of the train split

    def exported(self) -> dict[str, torch.Tensor]:
        """The layer on raw features: what the checkpoint's ``state_dict`` holds."""
        weight, bias = self.head.weight.detach(), self.head.bias.detach()
        if self.mean is not None:
            return fold_standardization(weight, bias, self.mean, self.std)
        return {"weight": weight.clone(), "bias": bias.clone()}


def scores(logits: torch.Tensor, labels: torch.Tensor) -> Scores:
    """Mean cross-entropy, top-1 and top-5 (percent) of float32 logits."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top == labels[:, None]
    count = len(labels)
    return Scores(
        loss=F.cross_entropy(logits, labels).item(),
        top1=100.0 * hits[:, 0].sum().item() / count,
        top5=100.0 * hits.any(dim=1).sum().item() / count,
    )


def split_scores(
    layer: dict[str, torch.Tensor], split: SplitTensors | StreamedSplit, device: torch.device
) -> Scores:
    """`scores` of a raw-feature layer on a whole split; a streamed one is summed block by block."""
    if isinstance(split, SplitTensors):
        return scores(predict(layer, split.features), split.labels)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.int64, device=device)
    top5 = torch.zeros((), dtype=torch.int64, device=device)
    for features, labels in split.chunks(device):
        logits = predict(layer, features)
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        loss += F.cross_entropy(logits, labels, reduction="sum").double()
        top1 += hits[:, 0].sum()
        top5 += hits.any(dim=1).sum()
    count = len(split)
    return Scores(
        loss=loss.item() / count, top1=100.0 * top1.item() / count, top5=100.0 * top5.item() / count
    )


@torch.no_grad()
def predict(
    layer: dict[str, torch.Tensor], features: torch.Tensor, batch_size: int = EVAL_BATCH
) -> torch.Tensor:
    """Logits (float32, on the features' device) of a raw-feature layer over all rows.

    Each slice is cast into one reused float32 buffer and its logits written in place. With a
    new 16 MB tensor per slice, the freed ones were not reused on the CPU and resident memory
    climbed by one slice per slice until the pass ended (130 MB for 10,000 rows).
    """
    weight = layer["weight"].to(features.device, torch.float32)
    bias = layer["bias"].to(features.device, torch.float32)
    logits = torch.empty(len(features), len(bias), device=features.device)
    buffer = torch.empty(min(batch_size, len(features)), features.shape[1], device=features.device)
    for start in range(0, len(features), batch_size):
        chunk = features[start : start + batch_size]
        rows = buffer[: len(chunk)].copy_(chunk)
        torch.addmm(bias, rows, weight.t(), out=logits[start : start + len(chunk)])
    return logits


def epoch_order(
    count: int, generator: torch.Generator, flip: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This epoch's sample order and, with flipped features, which images use the flipped view."""
    order = torch.randperm(count, generator=generator)
    flipped = torch.rand(count, generator=generator) < 0.5 if flip else None
    return order, flipped


def memory_batches(
    train: SplitTensors, batch_size: int, generator: torch.Generator, flip: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (features, labels) batches of the in-memory split, in the stored dtype."""
    device = train.features.device
    order, flipped = epoch_order(len(train), generator, flip and train.features_flip is not None)
    order = order.to(device)
    if flipped is not None:
        flipped = flipped.to(device)
    for start in range(0, len(train), batch_size):
        rows = order[start : start + batch_size]
        # Gathered in the stored dtype, then cast: half the bytes. index_select is the
        # fastest row gather on CPUs, 3x advanced indexing.
        features = train.features.index_select(0, rows)
        if flipped is not None:
            use_flip = flipped[start : start + batch_size]
            features = torch.where(
                use_flip[:, None], train.features_flip.index_select(0, rows), features
            )
        yield features, train.labels.index_select(0, rows)


def closed_form_step(
    weight: torch.Tensor,
    bias: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    bf16: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``features @ weight.T + bias`` and its gradient, without autograd.

    Sets ``weight.grad`` and ``bias.grad``; returns (loss, logits). With `bf16` the products run
    in bfloat16 as under autocast (the logits, G, dW and db in bfloat16, cast to float32), so
    the steps are those autograd takes with ``torch.autocast(dtype=torch.bfloat16)``.
    """
    # A context, not a decorator, so that the mutation run (make mutation) can reach the body.
    with torch.no_grad():
        if bf16:
            logits = torch.addmm(bias.bfloat16(), features.bfloat16(), weight.bfloat16().t())
        else:
            logits = torch.addmm(bias, features, weight.t())
        log_probs = logits.float().log_softmax(1)
        loss = -log_probs.gather(1, labels[:, None]).mean()
        gradient = log_probs.exp_()  # softmax
        gradient.scatter_add_(1, labels[:, None], torch.full_like(log_probs[:, :1], -1.0))
        gradient.div_(len(labels))
        if bf16:
            gradient = gradient.bfloat16()
            weight.grad = torch.mm(gradient.t(), features.bfloat16()).float()
            bias.grad = gradient.sum(0).float()
        else:
            weight.grad = torch.mm(gradient.t(), features)
            bias.grad = gradient.sum(0)
        return loss, logits


def train_step(
    run: Run,
    features: torch.Tensor,
    labels: torch.Tensor,
    bf16: bool,
    loss_sum: torch.Tensor,
    correct: torch.Tensor,
) -> None:
    """One Adam step on a batch in the stored dtype; adds its loss and hits to the sums."""
    features = features.float()
    if run.mean is not None:
        features = (features - run.mean) / run.std
    loss, logits = closed_form_step(run.head.weight, run.head.bias, features, labels, bf16)
    run.optimizer.step()
    loss_sum.add_(loss.double() * len(labels))
    correct.add_((logits.argmax(1) == labels).sum())


@dataclasses.dataclass
class EpochGraph:
    """`steps` training steps captured in one CUDA graph, reading rows through a device-side
    offset into the epoch's order; replaying it walks through the epoch without the host."""

    graph: torch.cuda.CUDAGraph
    steps: int
    order: torch.Tensor  # (N,) int64 on the device, refilled each epoch
    flipped: torch.Tensor | None  # (N,) bool: which rows use the flipped view this epoch
    offset: torch.Tensor  # () int64: the first row of the next step in `order`
    loss_sum: torch.Tensor
    correct: torch.Tensor


def graphed_step(
    run: Run, train: SplitTensors, batch_size: int, bf16: bool, graph: EpochGraph
) -> None:
    """The captured step: the batch at `graph.offset` of the order, then the offset moved on."""
    positions = torch.arange(batch_size, device=graph.order.device) + graph.offset
    rows = graph.order.index_select(0, positions)
    features = train.features.index_select(0, rows)
    if graph.flipped is not None:
        use_flip = graph.flipped.index_select(0, positions)
        features = torch.where(
            use_flip[:, None], train.features_flip.index_select(0, rows), features
        )
    labels = train.labels.index_select(0, rows)
    train_step(run, features, labels, bf16, graph.loss_sum, graph.correct)
    graph.offset.add_(batch_size)


def build_epoch_graph(run: Run, train: SplitTensors, settings: Settings) -> EpochGraph:
    """Capture the steps of one graph after warming them up on a side stream, as CUDA graphs
    require; the warm-up's changes to the head and to Adam are undone, so that capturing
    changes no result."""
    device = run.head.weight.device
    full_steps = len(train) // settings.batch_size
    steps = max(d for d in range(1, MAX_STEPS_PER_GRAPH + 1) if full_steps % d == 0)
    flip = settings.flip and train.features_flip is not None
    graph = EpochGraph(
        graph=torch.cuda.CUDAGraph(),
        steps=steps,
        order=torch.arange(len(train), device=device),
        flipped=torch.zeros(len(train), dtype=torch.bool, device=device) if flip else None,
        offset=torch.zeros((), dtype=torch.int64, device=device),
        loss_sum=torch.zeros((), dtype=torch.float64, device=device),
        correct=torch.zeros((), dtype=torch.int64, device=device),
    )
    bf16 = settings.precision == "bf16"
    adam = run.optimizer
    state = [run.head.weight, run.head.bias, *adam.exp_avgs, *adam.exp_avg_sqs, *adam.steps]
    saved = [tensor.detach().clone() for tensor in state]
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            graphed_step(run, train, settings.batch_size, bf16, graph)
            graph.offset.zero_()  # the first batch again: an epoch may hold only one
    torch.cuda.current_stream(device).wait_stream(side)
    with torch.no_grad():
        for tensor, value in zip(state, saved):
            tensor.copy_(value)
    with torch.cuda.graph(graph.graph):
        for _ in range(steps):
            graphed_step(run, train, settings.batch_size, bf16, graph)
    return graph


def graphed_epoch(run: Run, train: SplitTensors, settings: Settings, bar: tqdm) -> Scores:
    """`train_epoch` for in-memory features on CUDA: the full batches replayed from the graph,
    the last, shorter one (if any) stepped eagerly from the same order."""
    if run.graph is None:
        run.graph = build_epoch_graph(run, train, settings)
    graph = run.graph
    order, flipped = epoch_order(len(train), run.generator, graph.flipped is not None)
    graph.order.copy_(order, non_blocking=True)
    if flipped is not None:
        graph.flipped.copy_(flipped, non_blocking=True)
    graph.offset.zero_()
    graph.loss_sum.zero_()
    graph.correct.zero_()
    full_steps = len(train) // settings.batch_size
    for _ in range(full_steps // graph.steps):
        graph.graph.replay()
        bar.update(graph.steps * settings.batch_size)
    done = full_steps * settings.batch_size
    if done < len(train):
        rows = graph.order[done:]
        features = train.features.index_select(0, rows)
        if flipped is not None:
            features = torch.where(
                graph.flipped[done:, None], train.features_flip.index_select(0, rows), features
            )
        labels = train.labels.index_select(0, rows)
        bf16 = settings.precision == "bf16"
        train_step(run, features, labels, bf16, graph.loss_sum, graph.correct)
        bar.update(len(train) - done)
    return Scores(
        loss=graph.loss_sum.item() / len(train),
        top1=100.0 * graph.correct.item() / len(train),
        top5=math.nan,
    )


def uses_graphs(run: Run, train: SplitTensors | StreamedSplit, settings: Settings) -> bool:
    return (
        settings.cuda_graphs
        and run.head.weight.device.type == "cuda"
        and isinstance(train, SplitTensors)
        and len(train) >= settings.batch_size
    )


def train_epoch(
    run: Run, train: SplitTensors | StreamedSplit, settings: Settings, bar: tqdm
) -> Scores:
    """One pass over the train split in the generator's order; returns running loss and top-1.

    Loss and hits add up in tensors on the device and are read once at the end of the epoch:
    a `.item()` per step would wait for the device after every step.
    """
    run.head.train()
    if uses_graphs(run, train, settings):
        return graphed_epoch(run, train, settings, bar)
    device = run.head.weight.device
    if isinstance(train, StreamedSplit):
        batches = stream_batches(train, settings.batch_size, run.generator, device)
    else:
        batches = memory_batches(train, settings.batch_size, run.generator, settings.flip)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    bf16 = settings.precision == "bf16"
    for features, labels in batches:
        train_step(run, features, labels, bf16, loss_sum, correct)
        bar.update(len(labels))
    return Scores(
        loss=loss_sum.item() / len(train), top1=100.0 * correct.item() / len(train), top5=math.nan
    )


def validate(run: Run, val: SplitTensors | StreamedSplit | None) -> Scores:
    if val is None:
        return Scores(math.nan, math.nan, math.nan)
    return split_scores(run.exported(), val, run.head.weight.device)


def record(
    run: Run, epoch: int, train_scores: Scores, val_scores: Scores, seconds: float, has_val: bool
) -> bool:
    """Append one epoch to the history; returns whether it is the best so far."""
    for key, value in (
        ("history_epochs", epoch),
        ("train_loss", train_scores.loss),
        ("train_accuracy", train_scores.top1),
        ("validation_loss", val_scores.loss),
        ("validation_accuracy", val_scores.top1),
        ("validation_top5", val_scores.top5),
        ("time", seconds),
    ):
        run.history[key].append(value)
    run.epoch = epoch
    # Higher val top-1 is better; without val, lower train loss (negated to compare alike).
    score = val_scores.top1 if has_val else -train_scores.loss
    if math.isnan(run.best_score) or score > run.best_score:
        run.best_score = score
        run.best_epoch = epoch
        run.best_accuracy = val_scores.top1 if has_val else train_scores.top1
        return True
    return False


def epoch_line(
    epoch: int, epochs: int, train_scores: Scores, val_scores: Scores, seconds: float
) -> str:
    val = (
        "val -"
        if math.isnan(val_scores.loss)
        else f"val loss {val_scores.loss:.3f} top1 {val_scores.top1:.1f}% "
        f"top5 {val_scores.top5:.1f}%"
    )
    return (
        f"epoch {epoch}/{epochs}  train loss {train_scores.loss:.3f} "
        f"top1 {train_scores.top1:.1f}%  {val}  {seconds:.1f} s"
    )


def to_checkpoint(run: Run, data: FeatureSet, settings: Settings, has_val: bool) -> dict:
    """The saved dict: the seed's keys, the provenance, and what resuming needs."""
    exported = run.exported()
    return {
        "epoch": run.epoch,
        "best_accuracy": run.best_accuracy,
        "state_dict": {
            "weight": exported["weight"].cpu().float(),
            "bias": exported["bias"].cpu().float(),
        },
        "optimizer": run.optimizer.state_dict(),
        **{key: list(values) for key, values in run.history.items()},
        "numeric_class_names": list(data.wnids),
        "tiny_class": dict(zip(data.wnids, data.names)),
        "features": dict(data.provenance),
        "best_epoch": run.best_epoch,
        "selection": "validation top-1" if has_val else "train loss",
        "args": settings.recorded(),
        "generator": run.generator.get_state(),
        "trainable": {
            name: value.detach().cpu().clone() for name, value in run.head.state_dict().items()
        },
        "standardization": None
        if run.mean is None
        else {"mean": run.mean.cpu(), "std": run.std.cpu()},
        checkpoint.REPLAY: run.replay,
    }


def adam(head: nn.Linear, settings: Settings) -> Adam:
    return Adam([head.weight, head.bias], lr=settings.lr, weight_decay=settings.weight_decay)


def new_run(data: FeatureSet, settings: Settings, device: torch.device) -> Run:
    mean = std = None
    if settings.standardize:
        chunks = (
            (features.to(device) for features, _ in data.train.chunks())
            if data.streamed
            else data.train.features.split(8192)
        )
        mean, std = standardization(chunks)
    if settings.init in PRETRAINED_INITS:
        head = pretrained_classifier_head(
            data.provenance, data.wnids, str(data.path), settings.init
        )
        if mean is not None:
            with torch.no_grad():
                head.load_state_dict(
                    unfold_standardization(head.weight, head.bias, mean.cpu(), std.cpu())
                )
    else:
        head = initial_head(data.feature_dim, data.num_classes, settings.seed)
    head = head.to(device)
    optimizer = adam(head, settings)
    generator = torch.Generator().manual_seed(settings.seed)
    return Run(head=head, optimizer=optimizer, generator=generator, mean=mean, std=std)


def resumed_run(path: Path, data: FeatureSet, settings: Settings, device: torch.device) -> Run:
    """Rebuild the run from `last.pt` after checking it continues this very training."""
    state = checkpoint.load(path)
    if "args" not in state or "trainable" not in state or "generator" not in state:
        raise UserError(f"{path}: not written by head.train (no training state); cannot resume")
    checkpoint.check_compatible(
        state, str(path), data.path, data.provenance, data.wnids, data.feature_dim
    )
    saved = {**Settings().recorded(), **state["args"]}  # a setting added later: its default
    changed = [
        f"--{key.replace('_', '-')} {saved[key]} -> {getattr(settings, key)}"
        for key in SAME_ON_RESUME
        if saved[key] != getattr(settings, key)
    ]
    if changed:
        raise UserError(f"{path}: cannot resume with other settings ({'; '.join(changed)})")
    head = initial_head(data.feature_dim, data.num_classes, settings.seed)
    head.load_state_dict(state["trainable"])
    head = head.to(device)
    optimizer = adam(head, settings)
    optimizer.load_state_dict(state["optimizer"])
    generator = torch.Generator()
    generator.set_state(state["generator"])
    standard = state["standardization"]
    run = Run(
        head=head,
        optimizer=optimizer,
        generator=generator,
        mean=None if standard is None else standard["mean"].to(device),
        std=None if standard is None else standard["std"].to(device),
    )
    run.history = {key: list(state[key]) for key in history.LISTS}
    run.epoch = int(state["epoch"])
    run.best_epoch = int(state["best_epoch"])
    run.best_accuracy = float(state["best_accuracy"])
    best = run.history["history_epochs"].index(run.best_epoch)
    run.best_score = (
        run.history["validation_accuracy"][best]
        if state["selection"] == "validation top-1"
        else -run.history["train_loss"][best]
    )
    return run


def save(
    run: Run, data: FeatureSet, settings: Settings, save_dir: Path, has_val: bool, is_best: bool
) -> dict:
    """best.pt (when this epoch is the best), then last.pt, then history.csv, each replaced
    whole. A write that fails (a full disk) stops the run with one line and leaves the files of
    the epoch before, or a best.pt one epoch ahead of last.pt, which --resume then redoes."""
    state = to_checkpoint(run, data, settings, has_val)
    try:
        if is_best:
            checkpoint.save_atomic(state, save_dir / checkpoint.BEST)
        checkpoint.save_atomic(state, save_dir / checkpoint.LAST)
        history.write_csv(state, save_dir / history.CSV)
    except OSError as error:
        raise UserError(
            f"{save_dir}: cannot save epoch {run.epoch} ({error.strerror or first_line(error)}); "
            f"last.pt and best.pt hold the epochs before, free some space and rerun with --resume"
        ) from None
    return state


def check_save_dir(save_dir: Path, settings: Settings) -> None:
    """A saved run is continued only with --resume and replaced only with --overwrite."""
    last = save_dir / checkpoint.LAST
    if save_dir.exists() and not save_dir.is_dir():
        raise UserError(f"{save_dir}: exists and is not a folder")
    if settings.resume and not last.is_file():
        raise UserError(f"{last}: nothing to resume (run without --resume to start)")
    if not settings.resume and last.exists() and not settings.overwrite:
        raise UserError(
            f"{last}: a run is already saved here (use --resume to continue it, "
            f"or --overwrite to start again)"
        )


def train(
    data: FeatureSet, save_dir: Path, settings: Settings, device: torch.device, report=print
) -> dict:
    """Train (or resume training) the head on `data`; returns the last checkpoint dict."""
    check_save_dir(save_dir, settings)
    last = save_dir / checkpoint.LAST
    if settings.flip and not (
        data.train.flip if data.streamed else data.train.features_flip is not None
    ):
        settings = dataclasses.replace(settings, flip=False)
    save_dir.mkdir(parents=True, exist_ok=True)
    has_val = data.val is not None
    if not has_val:
        report(
            f"note: {data.path} has no val split; training anyway and keeping as best.pt "
            f"the epoch with the lowest train loss"
        )

    run = (
        resumed_run(last, data, settings, device)
        if settings.resume
        else new_run(data, settings, device)
    )
    run.replay = checkpoint.replay_entry(*replay_set(data, settings.seed))
    state = None
    if run.epoch == 0 and settings.init in PRETRAINED_INITS and not run.history["history_epochs"]:
        # Before any step: how well ImageNet's own classifier rows already do, as epoch 0.
        started = time.perf_counter()
        train_scores = split_scores(run.exported(), data.train, device)
        val_scores = validate(run, data.val)
        seconds = time.perf_counter() - started
        is_best = record(run, 0, train_scores, val_scores, seconds, has_val)
        report(epoch_line(0, settings.epochs, train_scores, val_scores, seconds))
        state = save(run, data, settings, save_dir, has_val, is_best)
    if run.epoch >= settings.epochs and state is None:
        report(
            f"{last}: already trained for {run.epoch} epochs (--epochs {settings.epochs}); "
            f"nothing to do"
        )
    for epoch in range(run.epoch + 1, settings.epochs + 1):
        started = time.perf_counter()
        with tqdm(
            total=len(data.train),
            unit="img",
            desc=f"epoch {epoch}",
            leave=False,
            disable=not settings.progress,
        ) as bar:
            train_scores = train_epoch(run, data.train, settings, bar)
        val_scores = validate(run, data.val)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        if not math.isfinite(train_scores.loss):
            raise UserError(
                f"epoch {epoch}: the train loss is {train_scores.loss}; lower --lr "
                f"(the last good epoch is in {last})"
            )
        is_best = record(run, epoch, train_scores, val_scores, seconds, has_val)
        report(epoch_line(epoch, settings.epochs, train_scores, val_scores, seconds))
        state = save(run, data, settings, save_dir, has_val, is_best)
    if state is None:
        state = to_checkpoint(run, data, settings, has_val)
    try:
        history.write_plots(state, save_dir)
    except OSError as error:
        raise UserError(
            f"{save_dir}: cannot write the plots ({error.strerror or first_line(error)}); "
            f"the checkpoints of all {run.epoch} epochs are saved"
        ) from None
    return state
