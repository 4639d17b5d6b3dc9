"""DRESS (Dynamic REal-time Sparse Subnets, Qu et al., arXiv 2207.00670): nested row-sparse levels of a model.

Owns the per-weight level codes, the wrapper that runs any backbone's Linear/Conv2d layers at a level,
per-level FLOPs and bytes, the joint training recipe on the shipped digits, and `dress`: the user's own
pretrained model fine-tuned into nested levels on the user's data. Not the row-sparse storage or kernel
(`kernels/rowsparse.py`), the data checks (`userdata.py`) nor export: an exporter takes `dense_copy(level)`
or `masked_state_dict(level)` plus `codes`.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from edgeflex.errors import UsageError
from edgeflex.kernels.rowsparse import MAX_LEVELS
from edgeflex.models.digits import NUM_CLASSES, RECIPE, _random_shift, _top1, load_digits_images
from edgeflex.models.starnet import list_variants, starnet
from edgeflex.models.userdata import Checked, check_data, train_steps

log = logging.getLogger(__name__)

# Levels as densities (fraction of each row kept), densest first; level s keeps `row_nnz(DENSITIES[s], n)`.
DENSITIES: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1)

# Per-backbone training settings (see `train_dress_digits`). Budgets on a 2-core CPU: about a minute for s050,
# less for the mlp.
DRESS_RECIPES: dict[str, dict] = {
    "starnet": {
        "warmup_epochs": 8, "epochs": 10, "remask_epochs": 6,
        "lr": 4e-3, "joint_lr": 2e-3, "max_shift": 2,
    },
    "mlp": {
        "warmup_epochs": 20, "epochs": 40, "remask_epochs": 25,
        "lr": 4e-3, "joint_lr": 2e-3, "max_shift": 1,
    },
}

# Fine-tuning the user's pretrained model into levels (`dress`): from their weights, so fewer epochs and half
# the from-scratch joint learning rate (2e-3 in DRESS_RECIPES), as SN-Net fine-tunes its anchors at a lower
# rate (STITCH_RECIPE); codes re-ranked during the first half of the epochs, then fixed.
USER_RECIPE = {"epochs": 10, "remask_epochs": 5, "lr": 1e-3, "weight_decay": 0.05, "batch_size": 64}

PrunablePredicate = Callable[[nn.Module, str, nn.Module], bool]


def row_nnz(density: float, row_len: int) -> int:
    """Non-zeros each row keeps at `density`: max(1, round(density * row_len)) (Python's round)."""
    return max(1, round(density * row_len))


def check_densities(densities: Sequence[float]) -> tuple[float, ...]:
    """Validate level densities: the first is 1.0 (dense), then strictly decreasing, all > 0."""
    d = tuple(float(x) for x in densities)
    if not d or d[0] != 1.0 or any(b >= a for a, b in pairwise(d)) or d[-1] <= 0.0 or len(d) > 256:
        raise ValueError(
            f"densities must start at 1.0 and strictly decrease to > 0 (at most 256 levels), got {d}; "
            f"e.g. {DENSITIES}"
        )
    return d


def row_codes(weight: torch.Tensor, densities: Sequence[float] = DENSITIES) -> torch.Tensor:
    """Level codes (uint8, shape of `weight`) from per-row magnitude: element e is kept at level s iff
    code[e] >= s. Rows are `weight.reshape(out, -1)` (a conv's [out, in/groups*kh*kw]); each row's top
    `row_nnz(densities[s], row_len)` by |w| get code >= s. Ties go to the lower column (stable sort)."""
    d = check_densities(densities)
    rows = weight.detach().reshape(weight.shape[0], -1).abs()
    row_len = rows.shape[1]
    order = torch.sort(rows, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(row_len, device=rows.device).expand_as(order))
    codes = torch.zeros(rows.shape, dtype=torch.uint8, device=rows.device)
    for density in d[1:]:
        codes += (rank < row_nnz(density, row_len)).to(torch.uint8)
    return codes.reshape(weight.shape)


def is_prunable(backbone: nn.Module, name: str, module: nn.Module) -> bool:
    """Default predicate: every Linear and Conv2d except the first Conv2d (the stem) and the last Linear
    (the classifier). Both are tiny (s050: 896 and 1290 of ~0.4 M weights, digits head) and sit where
    sparsity costs the most accuracy: the stem sees only 3*3*3 = 27 inputs a row, the head makes the logits.
    NOTE: the paper copy reachable here held only the abstract and introduction, so whether DRESS itself
    keeps these two dense is not confirmed; keeping the first and last layer dense is common practice."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return False
    convs = [n for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear)]
    return not (convs and name == convs[0]) and not (linears and name == linears[-1])


class DressModel(nn.Module):
    """Any backbone (edgeflex's or the user's own module) with nested row-sparse levels: `set_level(s)` makes
    forward use weight * (codes >= s) for every prunable Linear/Conv2d weight, through `functional_call`, so
    the backbone's own forward runs unchanged. The backbone's parameters stay dense (they are what training
    updates); `codes` (uint8 buffers, keyed by the backbone's state_dict key) say which of them each level
    keeps."""

    family = "dress"

    def __init__(
        self,
        backbone: nn.Module,
        densities: Sequence[float] = DENSITIES,
        prunable: PrunablePredicate = is_prunable,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.levels: list[float] = list(check_densities(densities))
        self.level = 0
        self.quality: list[dict] | None = None     # per level, set by `dress`; what `ef.export` records
        self.backbone_family: str = getattr(backbone, "family", type(backbone).__name__.lower())
        self.variant: str | None = getattr(backbone, "variant", None)
        self.prunable_names: list[str] = [
            f"{name}.weight" for name, m in backbone.named_modules() if prunable(backbone, name, m)
        ]
        if not self.prunable_names:
            raise ValueError(
                f"no prunable layer in {type(backbone).__name__}: the predicate selected no Linear/Conv2d; "
                "pass prunable= that selects some"
            )
        # buffer names may not contain '.', so codes live under a child module with '.' -> '__'
        self._codes = nn.Module()
        for name in self.prunable_names:
            self._codes.register_buffer(name.replace(".", "__"), torch.empty(0, dtype=torch.uint8))
        self.recompute_codes()

    @property
    def codes(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self._codes, name.replace(".", "__")) for name in self.prunable_names}

    def recompute_codes(self) -> None:
        """Re-rank every prunable weight's rows by the current magnitudes."""
        for name in self.prunable_names:
            setattr(self._codes, name.replace(".", "__"),
                    row_codes(self.backbone.get_parameter(name), self.levels))

    def set_level(self, level: int) -> DressModel:
        if not 0 <= level < len(self.levels):
            raise ValueError(
                f"level must be in [0, {len(self.levels)}) for densities {self.levels}, got {level}"
            )
        self.level = level
        return self

    def masked_weights(self, level: int) -> dict[str, torch.Tensor]:
        """The prunable weights at `level` (differentiable with respect to the dense ones)."""
        codes = self.codes
        return {
            name: torch.where(codes[name] >= level, self.backbone.get_parameter(name), 0.0)
            for name in self.prunable_names
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.level == 0:  # densities[0] == 1.0: every code is >= 0
            return self.backbone(x)
        return functional_call(self.backbone, self.masked_weights(self.level), (x,))

    @torch.no_grad()
    def masked_state_dict(self, level: int) -> dict[str, torch.Tensor]:
        """The backbone's state_dict at `level` (detached copies; prunable weights masked)."""
        if not 0 <= level < len(self.levels):
            raise ValueError(f"level must be in [0, {len(self.levels)}), got {level}")
        state = {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}
        state.update({k: v.detach().clone() for k, v in self.masked_weights(level).items()})
        return state

    def dense_copy(self, level: int) -> nn.Module:
        """A plain copy of the backbone with the weights of `level` (no hooks), e.g. for torch.onnx.export."""
        model = copy.deepcopy(self.backbone)
        model.load_state_dict(self.masked_state_dict(level))
        return model


def joint_loss(model: DressModel, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable,
               weights: Sequence[float]) -> torch.Tensor:
    """DRESS's joint loss: the same batch through every level, sum_s weights[s] * loss_s, into one set of
    dense weights (a level whose weight is 0 is not run). Leaves the model at the last level run."""
    return sum(w * loss_fn(model.set_level(s)(x), y) for s, w in enumerate(weights) if w != 0.0)


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm to eval mode (statistics frozen, affine terms still train): statistics updated by
    every level in turn fit none of them, and one shared BN keeps every non-prunable tensor identical across
    levels (see `train_dress_digits`)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def _weight_uses(module: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Per Conv2d/Linear (by weight key): how often each weight element is multiplied in one forward of
    `example` at batch 1 -- output positions for a conv, output rows (tokens) for a Linear."""
    uses: dict[str, int] = {}
    hooks = []

    def hook(name: str) -> Callable:
        def record(m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            channels = out.shape[1] if isinstance(m, nn.Conv2d) else out.shape[-1]
            uses[name] = uses.get(name, 0) + out.numel() // channels

        return record

    for name, m in module.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook(f"{name}.weight")))
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            module(example[:1])
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return uses


def count_flops(module: nn.Module, example: torch.Tensor, nnz: dict[str, int] | None = None) -> int:
    """Forward FLOPs at batch 1 = 2 * MACs of every Conv2d and Linear (bias, norm, activations and the
    star product are not counted). `nnz` overrides a weight's non-zero count (the sparse levels)."""
    nnz = nnz or {}
    uses = _weight_uses(module, example)
    return sum(2 * nnz.get(k, module.get_parameter(k).numel()) * n for k, n in uses.items())


def level_stats(model: DressModel, example: torch.Tensor) -> list[dict]:
    """Per level: density, non-zeros and size of the prunable weights, FLOPs at batch 1 (`count_flops`),
    and param_bytes = float32 bytes of those non-zeros + every non-prunable parameter (no indices)."""
    codes = model.codes
    uses = _weight_uses(model.backbone, example)
    prunable = set(model.prunable_names)
    prunable_params = sum(c.numel() for c in codes.values())
    other_params = sum(p.numel() for k, p in model.backbone.named_parameters() if k not in prunable)
    stats = []
    for s, density in enumerate(model.levels):
        nnz = {k: int((c >= s).sum()) for k, c in codes.items()}
        flops = sum(2 * nnz.get(k, model.backbone.get_parameter(k).numel()) * n for k, n in uses.items())
        total = sum(nnz.values())
        stats.append({
            "level": s, "density": density, "nnz": total, "prunable_params": prunable_params,
            "flops": flops, "param_bytes": 4 * (total + other_params),
        })
    return stats


class DigitsMLP(nn.Module):
    """64 -> 256 -> 256 -> 10 with ReLU on the flattened raw 8x8 digit (any input of 64 values a sample)."""

    family = "mlp"

    def __init__(self, in_features: int = 64, hidden: int = 256, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.variant = f"{in_features}-{hidden}-{hidden}-{num_classes}"
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.head(F.relu(self.fc2(x)))


def build_backbone(arch: str) -> nn.Module:
    """`mlp` or `starnet-<variant>` (see `list_variants()`), untrained, with digits' 10 classes."""
    if arch == "mlp":
        return DigitsMLP()
    if arch.startswith("starnet-") and arch.removeprefix("starnet-") in list_variants():
        return starnet(arch.removeprefix("starnet-"), num_classes=NUM_CLASSES, in_chans=3)
    raise ValueError(
        f"unknown DRESS backbone {arch!r}; expected 'mlp' or one of "
        f"{['starnet-' + v for v in list_variants()]}"
    )


def train_dress_digits(
    arch: str = "starnet-s050",
    *,
    densities: Sequence[float] = DENSITIES,
    epochs: int | None = None,
    warmup_epochs: int | None = None,
    loss_weights: Sequence[float] | None = None,
    image_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> tuple[DressModel, dict]:
    """Train a DRESS model on the digits split; return it in eval() mode at level 0 and its held-out top-1
    per level. `epochs`/`warmup_epochs` default to `DRESS_RECIPES`; the mlp ignores `image_size` (raw 8x8).
    Uses 2 torch threads unless OMP_NUM_THREADS is set (restored on return), as `train_starnet_digits`.

    1. Warm-up: the dense backbone alone (AdamW, one-cycle, shifts, label smoothing as `digits.RECIPE`).
    2. Codes from the warmed-up magnitudes, then joint training: every step runs the same batch through
       every level and backpropagates sum_s loss_weights[s] * loss_s (default: equal, summing to 1) into
       the shared dense weights. Codes are re-ranked from magnitudes at the start of each of the first
       `remask_epochs` joint epochs, then kept fixed so the last epochs train the masks that ship.
       BatchNorm statistics are frozen at the warm-up's (affine terms still train) and shared by all
       levels: statistics updated by four levels in turn fit none of them (s050: level 0 fell to 9 %
       top-1), and one shared BN keeps every non-prunable tensor identical across levels (foldable).
    """
    dens = check_densities(densities)
    family = "mlp" if arch == "mlp" else "starnet"
    recipe = DRESS_RECIPES[family]
    epochs = recipe["epochs"] if epochs is None else epochs
    warmup_epochs = recipe["warmup_epochs"] if warmup_epochs is None else warmup_epochs
    if epochs < 1 or warmup_epochs < 0:
        raise ValueError(f"need epochs >= 1 and warmup_epochs >= 0, got {epochs} and {warmup_epochs}")
    weights = [1.0 / len(dens)] * len(dens) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(dens):
        raise ValueError(f"loss_weights needs one weight per level ({len(dens)}), got {len(weights)}")
    remask_epochs = min(recipe["remask_epochs"], epochs)
    image_size = 8 if family == "mlp" else image_size
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in load_digits_images(image_size, seed))
    if family == "mlp":  # one grey channel, raw 8x8 (normalised)
        x_train, x_test = x_train[:, :1], x_test[:, :1]

    threads_before = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:  # as digits.py: 2 threads unless the caller pinned them
        torch.set_num_threads(RECIPE["threads"])
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    backbone = build_backbone(arch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=RECIPE["label_smoothing"])
    batch_size = RECIPE["batch_size"]
    steps = math.ceil(len(y_train) / batch_size)

    def run_epochs(params: list, n: int, lr: float, step: Callable, on_epoch: Callable, phase: str) -> None:
        if n == 0:
            return
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=RECIPE["weight_decay"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=n, steps_per_epoch=steps)
        for epoch in range(n):
            on_epoch(epoch)
            order = torch.randperm(len(y_train), generator=gen)
            total = 0.0
            for i in range(0, len(order), batch_size):
                batch = order[i : i + batch_size]
                xb = _random_shift(x_train[batch], recipe["max_shift"], gen)
                loss = step(xb, y_train[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(batch)
            bar.set_postfix(phase=phase, loss=f"{total / len(order):.3f}")
            bar.update()

    def joint_step(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return joint_loss(model, xb, yb, loss_fn, weights)

    def remask(epoch: int) -> None:
        if epoch < remask_epochs:
            model.recompute_codes()

    start = time.perf_counter()
    try:
        bar = tqdm(total=warmup_epochs + epochs, desc=f"dress {arch} digits", disable=not progress)
        backbone.train()
        run_epochs(list(backbone.parameters()), warmup_epochs, recipe["lr"],
                   lambda xb, yb: loss_fn(backbone(xb), yb), lambda _: None, "dense")
        warmup_seconds = time.perf_counter() - start
        backbone.eval()
        dense_top1 = _top1(backbone, x_test, y_test)
        model = freeze_batchnorm(DressModel(backbone, dens).train())  # NOTE: shared BN, the warm-up's
        run_epochs(list(model.parameters()), epochs, recipe["joint_lr"], joint_step, remask, "joint")
        bar.close()
        train_seconds = time.perf_counter() - start
        model.eval()
        top1 = [_top1(model.set_level(s), x_test, y_test) for s in range(len(dens))]
        model.set_level(0)
        stats = level_stats(model, x_test[:1])
    finally:
        torch.set_num_threads(threads_before)
    log.info("dress %s digits: top1 per level %s (dense warm-up %.4f), %.1f s",
             arch, [f"{d:g}:{t:.4f}" for d, t in zip(dens, top1)], dense_top1, train_seconds)
    result = {
        "metric": "top1",
        "direction": "higher",
        "levels": [
            {"level": s, "density": d, "value": t, "flops": st["flops"], "param_bytes": st["param_bytes"]}
            for s, (d, t, st) in enumerate(zip(dens, top1, stats))
        ],
        "dense_warmup_top1": dense_top1,
        "train_seconds": train_seconds,
        "warmup_seconds": warmup_seconds,
        "arch": arch,
        "epochs": epochs,
        "warmup_epochs": warmup_epochs,
        "remask_epochs": remask_epochs,
        "loss_weights": weights,
        "image_size": image_size,
        "seed": seed,
    }
    return model, result


# --- the user's model on the user's data -------------------------------------------------------------------

@torch.no_grad()
def evaluate_levels(model: DressModel, data: Checked, batch_size: int = 512) -> list[float]:
    """Top-1 of every level on `data` (one pass per level); the model is left in eval mode at level 0."""
    model.eval()
    top1 = []
    for s in range(len(model.levels)):
        model.set_level(s)
        correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in data.batches(batch_size))
        top1.append(correct / data.rows)
    model.set_level(0)
    return top1


def _classes(model: nn.Module, example: torch.Tensor) -> int:
    """The class count of the user's classifier (its output's last axis), in one line if it is not one."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            out = model(example)
    except Exception as e:  # noqa: BLE001 - reported in one line
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UsageError(f"{type(model).__name__} fails on the train rows of shape "
                         f"{tuple(example.shape[1:])}: {type(e).__name__}: {text}") from e
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise UsageError(f"{type(model).__name__} returns {getattr(out, 'shape', type(out).__name__)}; dress "
                         "fine-tunes classifiers: expected logits of shape (batch, classes)")
    return int(out.shape[1])


def dress(model: nn.Module, train: Any, val: Any, *, densities: Sequence[float] = DENSITIES,
          prunable: PrunablePredicate | None = None, loss_weights: Sequence[float] | None = None,
          epochs: int = USER_RECIPE["epochs"], remask_epochs: int = USER_RECIPE["remask_epochs"],
          lr: float = USER_RECIPE["lr"], batch_size: int = USER_RECIPE["batch_size"], seed: int = 0,
          progress: bool = True) -> DressModel:
    """The user's pretrained classifier as a DRESS model, fine-tuned on `train`, each level scored on `val`;
    see `ef.elastic.dress`. The user's model is copied, never changed."""
    for what, value, low in (("epochs", epochs, 1), ("remask_epochs", remask_epochs, 0),
                             ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UsageError(f"{what} must be an int >= {low}, got {value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise UsageError(f"lr must be > 0, got {lr!r}")
    if not isinstance(model, nn.Module):
        raise UsageError(f"dress takes a torch.nn.Module, got {type(model).__name__}")
    try:
        dens = check_densities(densities)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if len(dens) > MAX_LEVELS:
        raise UsageError(f"densities {dens}: a bundle holds at most {MAX_LEVELS} levels (2-bit codes); "
                         f"e.g. {DENSITIES}")
    weights = [1.0 / len(dens)] * len(dens) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(dens) or any(w < 0 for w in weights) or not any(weights):
        raise UsageError(f"loss_weights needs one weight >= 0 per level ({len(dens)}), not all 0; got "
                         f"{list(loss_weights or [])}")
    start = time.perf_counter()
    train_data = check_data(train, "train")
    val_data = check_data(val, "val", sample_shape=train_data.sample_shape)
    example = train_data.head(2)
    classes = _classes(model, example)
    train_data.check_labels(classes)
    val_data.check_labels(classes)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    try:
        dm = DressModel(copy.deepcopy(model), dens, prunable or is_prunable)
    except ValueError as e:
        raise UsageError(f"{e}; the default keeps the first Conv2d and the last Linear dense") from None
    before = evaluate_levels(dm, val_data)          # the user's weights, masked by their own magnitudes
    loss_fn = nn.CrossEntropyLoss()

    def before_epoch(epoch: int) -> None:
        if epoch < remask_epochs:
            dm.recompute_codes()
        freeze_batchnorm(dm.train())

    try:
        train_steps(dm.parameters(), train_data, epochs=epochs, batch_size=batch_size, lr=lr,
                    weight_decay=USER_RECIPE["weight_decay"], gen=gen, desc="dress: joint fine-tuning",
                    progress=progress, before_epoch=before_epoch,
                    step_loss=lambda x, y: joint_loss(dm, x, y, loss_fn, weights))
    finally:
        dm.eval().set_level(0)
    top1 = evaluate_levels(dm, val_data)
    stats = level_stats(dm, example[:1])
    metric = {"metric": "top1", "direction": "higher", "split": "val"}
    dm.quality = [{**metric, "value": t, "density": d} for t, d in zip(top1, dens)]
    dm.report = {
        "levels": [{"level": s, "density": d, "value": t, "value_before": b, "flops": st["flops"],
                    "param_bytes": st["param_bytes"]}
                   for s, (d, t, b, st) in enumerate(zip(dens, top1, before, stats))],
        "metric": "top1", "direction": "higher", "prunable": list(dm.prunable_names),
        "train_rows": train_data.rows, "val_rows": val_data.rows, "epochs": epochs,
        "remask_epochs": min(remask_epochs, epochs), "lr": lr, "loss_weights": weights,
        "train_seconds": time.perf_counter() - start,
    }
    log.info("dress %s: val top1 per level %s (before fine-tuning %s)", type(model).__name__,
             [f"{d:g}:{t:.4f}" for d, t in zip(dens, top1)], [f"{b:.4f}" for b in before])
    return dm
