"""Stitchable networks (SN-Net, Pan et al., CVPR 2023) over any pretrained anchors of one family.

Owns the stitched network (`Stitched`: anchors seen as chains of layers, a stitching layer per config), how
an anchor is seen as a chain (`Layout`; `starnet_layout` for StarNet as its authors publish it, an adapter
for anything else), where neighbouring anchors may be stitched, the least-squares initialisation, the split
into shared segments the exporter chains, FLOPs, and `stitch`: the user's anchors stitched and jointly
trained on the user's data. Not StarNet-on-digits (`models/snnet.py`) nor the data checks (`userdata.py`).
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from edgeflex.errors import UsageError
from edgeflex.models.userdata import Checked, check_data, train_steps

log = logging.getLogger(__name__)

DIRECTIONS = ("slow-to-fast", "fast-to-slow", "both")
# The joint-training recipe for the user's anchors. The paper fine-tunes anchors and stitching layers together
# at 1/10 of the pre-training learning rate (4e-4 for anchors pre-trained at edgeflex's 4e-3) and fits the
# least squares on 100 images; at small feature maps (2x2 in StarNet's stage 2 at 32x32) 512 rows give enough
# pixels per channel (as models/snnet.py). Measured on two token mixers (tests/test_stitch.py's, 400 steps of
# pre-training on 8x8 digits, 10 joint epochs, seed 0): the stitched configs' top-1 rose with lr 1e-4 / 4e-4 /
# 1e-3 (slow-to-fast 0.66-0.81 / 0.81-0.88 / 0.84-0.91) while the anchors kept theirs (0.94-0.96).
STITCH_RECIPE = {"epochs": 10, "lr": 4e-4, "weight_decay": 0.05, "batch_size": 64, "ls_rows": 512,
                 "ridge": 1e-3, "stitches": 4}
LAYOUT_TOLERANCE = 1e-4       # a layout must reproduce its anchor's forward to this (relative to the output)
ADAPTER_FIX = "the adapter must give every module forward runs, in order: before, blocks, after"


class _Path(NamedTuple):
    """A config: front's layers[:front_stop], then (if `back`) stitch `stitch`, back's layers[back_start:]."""

    front: str
    front_stop: int
    back: str | None = None
    back_start: int = 0
    stitch: str = ""


@dataclass(frozen=True)
class Layout:
    """An anchor seen as a chain: `before` (stem, embedding), the `blocks` in the order forward runs them
    (a sequence, labelled b0, b1, ..., or a mapping label -> block), then `after` (norm, pool, head).
    Running them in turn must equal the anchor's forward; a stitch may leave or enter between any two."""

    before: nn.Module
    blocks: Sequence[nn.Module] | Mapping[str, nn.Module]
    after: nn.Module

    def layers(self) -> list[tuple[str, nn.Module]]:
        blocks = (list(self.blocks.items()) if isinstance(self.blocks, Mapping)
                  else [(f"b{i}", b) for i, b in enumerate(self.blocks)])
        return [("stem", self.before), *blocks, ("head", self.after)]


class _StarNetHead(nn.Module):
    """StarNet's last BatchNorm, global average pool, flatten and linear head, as one layer."""

    def __init__(self, norm: nn.Module, avgpool: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.norm, self.avgpool, self.head = norm, avgpool, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.avgpool(self.norm(x)), 1))


STARNET_ATTRIBUTES = ("stem", "stages", "norm", "avgpool", "head")


def starnet_layout(model: nn.Module) -> Layout:
    """StarNet as ma-xu/Rewrite-the-Stars publishes it (`imagenet/starnet.py`): `stem`, `stages` (a
    ModuleList of Sequential stages, each a down-sampler then blocks), `norm`, `avgpool`, `head`; forward =
    head(flatten(avgpool(norm(stages(stem(x)))))). Every down-sampler and block is a chain layer, labelled
    s<stage>down and s<stage>b<block>."""
    missing = [a for a in STARNET_ATTRIBUTES if not hasattr(model, a)]
    if missing or not all(isinstance(s, nn.Sequential) for s in getattr(model, "stages", [None])):
        raise UsageError(f"{type(model).__name__} is not laid out like StarNet (missing "
                         f"{missing or ['stages as nn.Sequential']}); expected attributes "
                         f"{', '.join(STARNET_ATTRIBUTES)}; describe it with "
                         "adapter=lambda m: Layout(before, blocks, after)")
    blocks: dict[str, nn.Module] = {}
    for s, stage in enumerate(model.stages):
        blocks[f"s{s}down"] = stage[0]
        blocks.update((f"s{s}b{b}", block) for b, block in enumerate(stage[1:]))
    return Layout(model.stem, blocks, _StarNetHead(model.norm, model.avgpool, model.head))


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _channels(act: torch.Tensor) -> int:
    """Feature maps (N, C, H, W) carry channels on axis 1; tokens (N, T, C) and vectors (N, C) last."""
    return act.shape[1] if act.ndim == 4 else act.shape[-1]


def _grid(act: torch.Tensor) -> tuple[int, ...]:
    """What a stitch must keep: a feature map's (H, W), a token sequence's length, nothing for vectors."""
    return ("map", *act.shape[2:]) if act.ndim == 4 else ("tokens", *act.shape[1:-1])


def _rows(act: torch.Tensor) -> torch.Tensor:
    """One row per pixel or token, channels as columns, in float64."""
    if act.ndim == 4:
        act = act.permute(0, 2, 3, 1)
    return act.reshape(-1, act.shape[-1]).double()


def stitching_layer(front_act: torch.Tensor, back_act: torch.Tensor) -> nn.Module:
    """A 1x1 conv between feature maps, a linear layer between tokens or vectors."""
    dims = (_channels(front_act), _channels(back_act))
    return nn.Conv2d(*dims, kernel_size=1, bias=True) if front_act.ndim == 4 else nn.Linear(*dims)


class Stitched(nn.Module):
    """Anchors (small -> large by FLOPs) plus stitching layers; `forward` runs the config set by `set_config`.

    Configs are the anchors (by name) and one per stitch, named `<front>.<last layer it runs>-<back>.<first
    layer it runs>`, e.g. `a1.s2b0-a0.s2b1`. `quality` (config -> metric dict) is filled by `stitch` and is
    what `ef.export` records when it is given none."""

    family = "snnet"

    def __init__(self, anchors: Mapping[str, nn.Module], layers: Mapping[str, list[tuple[str, nn.Module]]]):
        super().__init__()
        if len(anchors) < 2:
            raise UsageError(f"stitching needs >= 2 anchors, got {len(anchors)}")
        self.variant = "-".join(anchors)
        self.anchors = nn.ModuleDict(dict(anchors))
        self.stitches = nn.ModuleDict()
        self._layers = {name: list(layers[name]) for name in anchors}
        self._paths = {name: _Path(name, len(self._layers[name])) for name in anchors}
        self._names = list(anchors)
        self._config = self._names[-1]
        self.quality: dict[str, dict] | None = None

    def add_stitch(self, front: str, stop: int, back: str, start: int, layer: nn.Module) -> str:
        """Add the config front.layers[:stop] -> `layer` -> back.layers[start:]; return its name."""
        name = f"{front}.{self._layers[front][stop - 1][0]}-{back}.{self._layers[back][start][0]}"
        key = name.replace(".", "_")  # ModuleDict keys may not hold dots
        self.stitches[key] = layer
        self._paths[name] = _Path(front, stop, back, start, key)
        self._names.append(name)
        return name

    def order_by_flops(self, example: torch.Tensor) -> dict[str, dict[str, int]]:
        """Sort the configs by FLOPs on `example`; the anchors must already be small -> large."""
        anchors = list(self.anchors)
        stats = config_stats(self, example)
        self._names.sort(key=lambda n: stats[n]["flops"])
        if [n for n in self._names if n in anchors] != anchors:
            raise UsageError(f"anchors must be given small -> large by FLOPs, got {anchors} with FLOPs "
                             f"{[stats[a]['flops'] for a in anchors]}")
        self._config = anchors[-1]
        return stats

    def config_names(self) -> list[str]:
        """Every config, smallest FLOPs first (the first and last are the smallest and largest anchor)."""
        return list(self._names)

    @property
    def config(self) -> str:
        return self._config

    def set_config(self, name: str) -> None:
        if name not in self._paths:
            raise ValueError(f"unknown SN-Net config {name!r}; expected one of {self._names}")
        self._config = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self._paths[self._config]
        for _, layer in self._layers[path.front][: path.front_stop]:
            x = layer(x)
        if path.back is None:
            return x
        x = self.stitches[path.stitch](x)
        for _, layer in self._layers[path.back][path.back_start :]:
            x = layer(x)
        return x


def _stitched(model: Stitched) -> dict[str, _Path]:
    return {name: p for name, p in model._paths.items() if p.back is not None}


def segment_plan(model: Stitched) -> tuple[dict[str, nn.Module], dict[str, list[str]]]:
    """Split `model` at its stitch points into segments, each stored once, and chain them per config.

    Returns (segments, plan): every segment takes one tensor and returns one (it shares the model's modules,
    it does not copy them); `plan[config]` lists the segment names whose chained application equals
    `model.set_config(config); model(x)`. Anchor segments are named `<anchor>.<first>-<last layer>`,
    stitching layers `stitch.<config>`.
    """
    cuts = {name: {0, len(layers)} for name, layers in model._layers.items()}
    for p in _stitched(model).values():
        cuts[p.front].add(p.front_stop)
        cuts[p.back].add(p.back_start)
    segments: dict[str, nn.Module] = {}
    pieces: dict[str, list[tuple[int, int, str]]] = {}
    for name, layers in model._layers.items():
        bounds = sorted(cuts[name])
        pieces[name] = []
        for start, stop in itertools.pairwise(bounds):
            first, last = layers[start][0], layers[stop - 1][0]
            seg = f"{name}.{first}" if stop - start == 1 else f"{name}.{first}-{last}"
            segments[seg] = nn.Sequential(*(layer for _, layer in layers[start:stop]))
            pieces[name].append((start, stop, seg))
    plan: dict[str, list[str]] = {}
    for config in model.config_names():
        p = model._paths[config]
        plan[config] = [seg for _, stop, seg in pieces[p.front] if stop <= p.front_stop]
        if p.back is not None:
            segments[f"stitch.{config}"] = model.stitches[p.stitch]
            plan[config].append(f"stitch.{config}")
            plan[config] += [seg for start, _, seg in pieces[p.back] if start >= p.back_start]
    return segments, plan


@torch.no_grad()
def config_stats(model: Stitched, example: torch.Tensor) -> dict[str, dict[str, int]]:
    """Per config: `flops` = 2 x multiply-accumulates of its Conv2d/Linear layers on `example[:1]` (batch 1),
    `param_bytes` = float32 bytes of the parameters its segments hold (BatchNorm affine terms included)."""
    segments, plan = segment_plan(model)
    counter = [0]

    def count(module: nn.Module, _: tuple, out: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            counter[0] += 2 * out.numel() * module.in_channels // module.groups * kh * kw
        else:
            counter[0] += 2 * out.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    stats = {}
    try:
        with _eval_mode(model):
            for config, chain in plan.items():
                counter[0], x = 0, example[:1]
                for seg in chain:
                    x = segments[seg](x)
                params = {id(p): p for seg in chain for p in segments[seg].parameters()}
                param_bytes = 4 * sum(p.numel() for p in params.values())
                stats[config] = {"flops": counter[0], "param_bytes": param_bytes}
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def _activations(model: Stitched, anchor: str, x: torch.Tensor) -> list[torch.Tensor]:
    """acts[k] = the anchor's activation after its first k layers (acts[0] is the input)."""
    acts = [x]
    for _, layer in model._layers[anchor]:
        acts.append(layer(acts[-1]))
    return acts


@torch.no_grad()
def stitch_errors(model: Stitched, x: torch.Tensor) -> dict[str, float]:
    """Per stitched config: ||stitch(front act) - back act||^2 / ||back act - its mean||^2 on `x`."""
    errors = {}
    with _eval_mode(model):
        acts = {name: _activations(model, name, x) for name in model.anchors}
        for config, p in _stitched(model).items():
            target = _rows(acts[p.back][p.back_start])
            pred = _rows(model.stitches[p.stitch](acts[p.front][p.front_stop]))
            errors[config] = float((pred - target).square().sum() / (target - target.mean(0)).square().sum())
    return errors


@torch.no_grad()
def lstsq_init(model: Stitched, x: torch.Tensor, *,
               ridge: float = STITCH_RECIPE["ridge"]) -> dict[str, float]:
    """Set every stitching layer to the ridge least-squares map from the front anchor's activation to the
    back anchor's, both on the inputs `x` (the paper's M = pinv(A) B, with a bias); return `stitch_errors`.

    `ridge` is relative to the mean eigenvalue of the centred Gram matrix, which keeps the solve stable
    when there are few pixels per channel (2x2 maps in StarNet's stage 2 at 32x32)."""
    with _eval_mode(model):
        acts = {name: _activations(model, name, x) for name in model.anchors}
        for p in _stitched(model).values():
            a, b = _rows(acts[p.front][p.front_stop]), _rows(acts[p.back][p.back_start])
            a_mean, b_mean = a.mean(0), b.mean(0)
            a, b = a - a_mean, b - b_mean
            gram = a.T @ a
            gram += ridge * gram.trace() / len(gram) * torch.eye(len(gram), dtype=gram.dtype)
            weight = torch.linalg.solve(gram, a.T @ b)  # (C_front, C_back)
            layer = model.stitches[p.stitch]
            layer.weight.copy_(weight.T.reshape(layer.weight.shape))
            layer.bias.copy_(b_mean - a_mean @ weight)
    return stitch_errors(model, x)


# --- where neighbouring anchors stitch -------------------------------------------------------------------

def stitch_points(front: list[torch.Tensor], back: list[torch.Tensor],
                  limit: int | None = STITCH_RECIPE["stitches"]) -> list[tuple[int, int]]:
    """(stop, start) pairs: the front anchor runs its layers[:stop], the back one resumes at layers[start:].

    `front` and `back` are the anchors' activations (`_activations`: acts[k] after k layers). A stitch
    leaves the front after one of its blocks (never after the stem alone) and enters the back before one of
    its blocks (never just before its head), where the activations have the same grid (feature-map size,
    token count). Within a grid the back resumes at the depth the front reached, as a fraction of that
    grid's layers (the paper pairs block i with block i at equal depths). `limit` keeps that many, spread
    evenly from the earliest to the latest (None: all)."""
    n_back = len(back) - 1                                # layers: stem, blocks..., head

    def groups(acts: list[torch.Tensor]) -> dict[tuple, list[int]]:
        out: dict[tuple, list[int]] = {}
        for k in range(1, len(acts) - 1):                   # after the stem ... after the last block
            out.setdefault(_grid(acts[k]), []).append(k)
        return out

    front_groups, back_groups = groups(front), groups(back)
    points = []
    for grid, ks in front_groups.items():
        if grid not in back_groups:
            continue
        js = back_groups[grid]
        for p, stop in enumerate(ks):
            if stop < 2:                                     # front runs >= 1 block
                continue
            q = min(len(js) - 1, max(0, int((p + 1) * len(js) / len(ks) + 0.5) - 1))   # half up
            start = js[q]
            if start <= n_back - 2:                          # back runs >= 1 block before its head
                points.append((stop, start))
    points = sorted(set(points))
    if limit is not None and len(points) > limit:
        picks = np.unique(np.round(np.linspace(0, len(points) - 1, limit)).astype(int))
        points = [points[i] for i in picks]
    return points


def build(anchors: Sequence[nn.Module], example: torch.Tensor, *,
          adapter: Callable[[nn.Module], Layout] | None = None, names: Sequence[str] | None = None,
          direction: str = "slow-to-fast", stitches: int | None = STITCH_RECIPE["stitches"]) -> Stitched:
    """The untrained stitched network over `anchors` (small -> large): layouts from `adapter` (default
    `starnet_layout`), each checked to reproduce its anchor's forward on `example`, stitching layers
    between each pair of neighbours at `stitch_points`, in `direction`: slow-to-fast = the larger anchor in
    front (measured better for StarNet: docs/elastic.md), fast-to-slow = the paper's ViT default, or both."""
    if direction not in DIRECTIONS:
        raise UsageError(f"direction {direction!r}; expected one of {', '.join(DIRECTIONS)}")
    if stitches is not None and stitches < 1:
        raise UsageError(f"stitches must be >= 1 per pair and direction (or None: all), got {stitches}")
    anchors = list(anchors)
    names = list(names) if names is not None else [f"a{i}" for i in range(len(anchors))]
    bad = any("." in n or "-" in n for n in names)
    if len(names) != len(anchors) or len(set(names)) != len(names) or bad:
        raise UsageError(f"names {names}: expected {len(anchors)} distinct names without '.' or '-'")
    if not all(isinstance(a, nn.Module) for a in anchors):
        raise UsageError(f"anchors must be torch.nn.Modules, got {[type(a).__name__ for a in anchors]}")
    adapter = adapter or starnet_layout
    layers, acts = {}, {}
    for name, anchor in zip(names, anchors, strict=True):
        layout = adapter(anchor)
        if not isinstance(layout, Layout):
            raise UsageError(f"adapter returned {type(layout).__name__} for anchor {name}; expected a Layout")
        layers[name] = layout.layers()
        acts[name] = _checked_layout(name, anchor, layers[name], example)
    model = Stitched(dict(zip(names, anchors, strict=True)), layers)
    for small, large in itertools.pairwise(names):
        pairs = {"slow-to-fast": [(large, small)], "fast-to-slow": [(small, large)],
                 "both": [(large, small), (small, large)]}[direction]
        added = 0
        for front, back in pairs:
            for stop, start in stitch_points(acts[front], acts[back], stitches):
                layer = stitching_layer(acts[front][stop], acts[back][start])
                model.add_stitch(front, stop, back, start, layer)
                added += 1
        if not added:
            shapes = {n: [tuple(a.shape[1:]) for a in acts[n][1:-1]] for n in (small, large)}
            raise UsageError(f"anchors {small} and {large} have no block outputs of the same grid to stitch "
                             f"(feature-map size or token count): {shapes}; check the adapter's blocks")
    model.order_by_flops(example)
    return model.eval()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


@torch.no_grad()
def _checked_layout(name: str, anchor: nn.Module, layers: list[tuple[str, nn.Module]],
                    example: torch.Tensor) -> list[torch.Tensor]:
    """The layout's activations on `example`, once its chain is checked to equal the anchor's forward."""
    with _eval_mode(anchor):
        try:
            expected = anchor(example)
        except Exception as e:  # noqa: BLE001 - reported in one line
            raise UsageError(f"anchor {name} ({type(anchor).__name__}) fails on inputs of shape "
                             f"{tuple(example.shape[1:])}: {_first_line(e)}") from e
        acts = [example]
        try:
            for _, layer in layers:
                acts.append(layer(acts[-1]))
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"anchor {name}: its layout fails after {len(acts) - 1} layers "
                             f"({_first_line(e)}); {ADAPTER_FIX}") from e
    if not isinstance(expected, torch.Tensor) or acts[-1].shape != expected.shape:
        raise UsageError(f"anchor {name}: its layout gives shape {tuple(acts[-1].shape)}, its forward "
                         f"{getattr(expected, 'shape', type(expected).__name__)}; {ADAPTER_FIX}")
    err = float((acts[-1] - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    if err > LAYOUT_TOLERANCE:
        raise UsageError(f"anchor {name}: its layout differs from its forward by {err:.2g} (relative; at "
                         f"most {LAYOUT_TOLERANCE:g}); {ADAPTER_FIX} (flatten, activations, residuals too)")
    return acts


# --- the user's anchors on the user's data ---------------------------------------------------------------

@torch.no_grad()
def evaluate(model: Stitched, data: Checked, configs: Sequence[str] | None = None,
             batch_size: int = 512) -> dict[str, float]:
    """Top-1 of every config (or of `configs`) on `data` (the model's current config is kept)."""
    current, top1 = model.config, {}
    with _eval_mode(model):
        for name in model.config_names() if configs is None else configs:
            model.set_config(name)
            correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in data.batches(batch_size))
            top1[name] = correct / data.rows
    model.set_config(current)
    return top1


def joint_train(model: Stitched, data: Checked, *, epochs: int, lr: float, batch_size: int,
                gen: torch.Generator, progress: bool) -> None:
    """The paper's joint training: each step one config, uniformly sampled (anchors included), updates all
    it runs, anchors too ("fulltune"). AdamW with a one-cycle schedule, cross-entropy."""
    if epochs == 0:
        return
    names = model.config_names()
    loss_fn = nn.CrossEntropyLoss()

    def step_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model.set_config(names[int(torch.randint(len(names), (1,), generator=gen))])
        return loss_fn(model(x), y)

    model.train()
    try:
        train_steps(model.parameters(), data, epochs=epochs, batch_size=batch_size, lr=lr,
                    weight_decay=STITCH_RECIPE["weight_decay"], gen=gen, step_loss=step_loss,
                    desc="stitch: joint training", progress=progress)
    finally:
        model.eval()


def stitch(anchors: Sequence[nn.Module], train: Any, val: Any, *,
           adapter: Callable[[nn.Module], Layout] | None = None, names: Sequence[str] | None = None,
           direction: str = "slow-to-fast", stitches: int | None = STITCH_RECIPE["stitches"],
           epochs: int = STITCH_RECIPE["epochs"], lr: float = STITCH_RECIPE["lr"],
           batch_size: int = STITCH_RECIPE["batch_size"], ls_rows: int = STITCH_RECIPE["ls_rows"],
           seed: int = 0, progress: bool = True) -> Stitched:
    """Stitch pretrained classifiers of one family (smallest first) into one network with a config per
    stitch, trained on `train` and scored on `val`; see `ef.elastic.stitch`."""
    for what, value, low in (("epochs", epochs, 0), ("batch_size", batch_size, 1), ("ls_rows", ls_rows, 1)):
        if not isinstance(value, int) or value < low:
            raise UsageError(f"{what} must be an int >= {low}, got {value!r}")
    if not lr > 0:
        raise UsageError(f"lr must be > 0, got {lr!r}")
    start = time.perf_counter()
    anchors = list(anchors)
    if len(anchors) < 2:
        raise UsageError(f"stitching needs >= 2 anchors (smallest first), got {len(anchors)}")
    if not all(isinstance(a, nn.Module) for a in anchors):
        raise UsageError(f"anchors must be torch.nn.Modules, got {[type(a).__name__ for a in anchors]}")
    train_data = check_data(train, "train")
    val_data = check_data(val, "val", sample_shape=train_data.sample_shape)
    example = train_data.head(2)
    classes = _classes(anchors, names, example)
    train_data.check_labels(classes)
    val_data.check_labels(classes)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    anchors = [copy.deepcopy(a) for a in anchors]     # joint training tunes them: the user's stay as they are
    model = build(anchors, example, adapter=adapter, names=names, direction=direction, stitches=stitches)
    before = evaluate(model, val_data, list(model.anchors))       # the anchors as they came
    ls_errors = lstsq_init(model, train_data.head(ls_rows))
    ls_top1 = evaluate(model, val_data)
    joint_train(model, train_data, epochs=epochs, lr=lr, batch_size=batch_size, gen=gen, progress=progress)
    top1 = evaluate(model, val_data)
    stats = config_stats(model, example)
    configs = model.config_names()
    model.set_config(configs[-1])
    metric = {"metric": "top1", "direction": "higher", "split": "val"}
    model.quality = {n: {**metric, "value": top1[n]} for n in configs}
    model.report = {
        "configs": [{"name": n, "value": top1[n], **stats[n], "value_ls_init": ls_top1[n],
                     "value_before": before.get(n), "ls_error": ls_errors.get(n)}
                    for n in configs],
        "metric": "top1", "direction": "higher", "train_rows": train_data.rows, "val_rows": val_data.rows,
        "epochs": epochs, "lr": lr, "direction_stitched": direction,
        "train_seconds": time.perf_counter() - start,
    }
    for c in model.report["configs"]:
        log.info("stitch %s: val top1 %.4f (least squares %.4f), %d FLOPs", c["name"], c["value"],
                 c["value_ls_init"], c["flops"])
    return model


def _classes(anchors: list[nn.Module], names: Sequence[str] | None, example: torch.Tensor) -> int:
    """The anchors' class count (their output's last axis), which must agree."""
    outs = {}
    for i, anchor in enumerate(anchors):
        label = names[i] if names is not None and i < len(names) else f"a{i}"
        with _eval_mode(anchor), torch.no_grad():
            try:
                out = anchor(example)
            except Exception as e:  # noqa: BLE001 - reported in one line
                raise UsageError(f"anchor {label} ({type(anchor).__name__}) fails on the train rows of "
                                 f"shape {tuple(example.shape[1:])}: {_first_line(e)}") from e
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            raise UsageError(f"anchor {label} returns {getattr(out, 'shape', type(out).__name__)}; stitch "
                             "trains classifiers: expected logits of shape (batch, classes)")
        outs[label] = out.shape[1]
    if len(set(outs.values())) != 1:
        raise UsageError(f"the anchors disagree on the class count: {outs}; anchors of one family share "
                         "a head size")
    return next(iter(outs.values()))

