"""SN-Net (Stitchable Neural Networks, Pan et al., CVPR 2023) over StarNet anchors trained on the corrupted
digits (clean digits saturate: every config scores ~0.99, so the accuracy-FLOPs curve would show nothing).

Owns where StarNets are stitched by hand (`STITCH_PLANS`) and the digits recipe; the stitched network, its
least-squares initialisation and its split into shared segments are `models/stitch.py`'s, for any anchors.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from edgeflex.models.digits import RECIPE, _top1, augment, data_name, load_digits_images, train_starnet_digits
from edgeflex.models.starnet import StarNet
from edgeflex.models.stitch import (
    Stitched,
    _eval_mode,
    config_stats,
    lstsq_init,
    segment_plan,
    starnet_layout,
    stitch_errors,
)

log = logging.getLogger(__name__)

__all__ = ["FAST_TO_SLOW_PLANS", "SNNET_RECIPE", "STITCH_PLANS", "SNNet", "config_stats", "evaluate",
           "lstsq_init", "segment_plan", "stitch_errors", "train_snnet_digits"]

# Stitch points per pair of nearest anchors, keyed (front, back): (stage, front_block, back_block) = the front
# anchor runs through block `front_block` of `stage`, a 1x1 conv maps its channels, the back anchor resumes at
# block `back_block` of the same stage, so the resolutions always match (back_block == depth: it resumes at
# the next stage).
#
# The direction is Slow-to-Fast (the larger anchor in front, the smaller behind), the reverse of the paper's
# Fast-to-Slow default for ViTs, because that is the one that interpolates here. Measured (corrupted digits,
# 30 joint epochs, seeds 0 and 1, both directions trained together; benchmarks/RESULTS.md):
#   Fast-to-Slow (s050 -> s100), 4 configs: every one below s050 (0.838-0.866 vs s050 0.866/0.871);
#   Slow-to-Fast (s100 -> s050), 4 configs: 0.867-0.883 and 0.867-0.889, rising with FLOPs between s050 and
#   s100 (0.883/0.884). Over 4 seeds the Fast-to-Slow configs scored below s050 in 16/16 runs. StarNet's
#   narrow early stages (16 channels in s050) lose what the wider back cannot recover; the wide front of s100
#   keeps it, and the late stages of s050 classify from it nearly as well as s100's.
# s100 (1, 2, 4, 1) -> s050 (1, 1, 3, 1): (1, 0, 0) leaves s100 after its first stage-1 block into s050's
# stage 1; (2, 0, 1), (2, 1, 2) are the depth-interpolated pairs (block i of the deeper stage feeds block
# i + 1 of the shallower one); (2, 2, 2) runs three of s100's four stage-2 blocks, then s050's last.
# A config chains at most 6 segments. s150 -> s100 (same depths in stages 0-2): (2, 0, 1), (2, 2, 3).
# The paper's Fast-to-Slow plans are kept in FAST_TO_SLOW_PLANS (SNNet(plans=...) takes either, or both).
STITCH_PLANS: dict[tuple[str, str], tuple[tuple[int, int, int], ...]] = {
    ("s100", "s050"): ((1, 0, 0), (2, 0, 1), (2, 1, 2), (2, 2, 2)),
    ("s150", "s100"): ((2, 0, 1), (2, 2, 3)),
}
FAST_TO_SLOW_PLANS: dict[tuple[str, str], tuple[tuple[int, int, int], ...]] = {
    ("s050", "s100"): ((1, 0, 1), (2, 0, 1), (2, 0, 3), (2, 2, 3)),
    ("s100", "s150"): ((2, 0, 1), (2, 2, 3)),
}

# Joint training after the least-squares initialisation. The paper fine-tunes anchors and stitching layers
# together ("fulltune") at 1/10 of the pre-training learning rate (its DeiT recipe: 5e-5 vs 5e-4). It solves
# the least squares on 100 images; stage-2 maps are 2x2 here, so 512 images give enough pixels per channel.
# Epochs for the corrupted digits: 50 anchor + 30 joint epochs take minutes on 2 loaded cores (1 thread).
# `distill` and `freeze_bn` (see `_joint_train`) are off: on the corrupted digits neither lifted the stitched
# configs (Fast-to-Slow s050 -> s100 and s025 -> s100, seed 0; benchmarks/RESULTS.md, "SN-Net recipes tried").
SNNET_RECIPE = {"lr": 4e-4, "ls_images": 512, "ridge": 1e-3, "anchor_epochs": 50, "epochs": 30,
                "distill": 0.0, "freeze_bn": False}
# A stitched config more than this outside the anchors' top-1 range is logged as off the curve.
OFF_CURVE = 0.02


def _block_index(net: StarNet, stage: int, block: int) -> int:
    """Flat index of `block` of `stage` in `starnet_layout(net).layers()` (block == depth: the layer that
    follows the stage)."""
    return 2 + sum(len(net.stages[t]) for t in range(stage)) + block


class SNNet(Stitched):
    """StarNet anchors (small -> large) plus stitching layers at hand-made `STITCH_PLANS`; `forward` runs the
    config chosen by `set_config`.

    Configs are the pure anchors (named by variant) and one per stitch point, named
    `<front>.<last layer it runs>-<back>.<first layer it runs>`, e.g. `s100.s2b0-s050.s2b1`.
    """

    def __init__(
        self,
        anchors: Sequence[StarNet],
        *,
        image_size: int = 32,
        plans: Mapping[tuple[str, str], Sequence[tuple[int, int, int]]] | None = None,
    ) -> None:
        plans = STITCH_PLANS if plans is None else plans
        names = [a.variant for a in anchors]
        if len(anchors) < 2 or None in names or len(set(names)) != len(names):
            raise ValueError(f"SNNet needs >= 2 StarNets with distinct variant names, got {names}")
        if len({(a.num_classes, a.stem[0].conv.in_channels, len(a.stages)) for a in anchors}) != 1:
            raise ValueError(f"anchors {names} differ in classes, input channels or stage count")
        pairs = list(zip(names, anchors, strict=True))
        super().__init__(dict(pairs), {name: starnet_layout(net).layers() for name, net in pairs})
        self.image_size = image_size
        for small, large in itertools.pairwise(names):
            pairs = [p for p in ((large, small), (small, large)) if p in plans]
            if not pairs:
                raise ValueError(
                    f"no stitch plan between {small} and {large}; anchors are given small -> large, nearest "
                    f"pairs stitch in either direction, keyed (front, back): {sorted(plans)} (add the pair "
                    "to STITCH_PLANS)"
                )
            for front, back in pairs:
                for stage, i, j in plans[(front, back)]:
                    self._add_stitch(front, back, stage, i, j)
        in_chans = anchors[0].stem[0].conv.in_channels
        self.order_by_flops(torch.zeros(1, in_chans, image_size, image_size))

    def _add_stitch(self, front: str, back: str, stage: int, i: int, j: int) -> None:
        a, b = self.anchors[front], self.anchors[back]
        where = f"stitch ({stage}, {i}, {j}) of {front} -> {back}"
        if not (0 <= stage < len(a.stages) and 0 <= i < len(a.stages[stage]) - 1):
            raise ValueError(f"{where}: {front} has no block {i} in stage {stage}")
        if not 0 <= j < len(b.stages[stage]):
            raise ValueError(f"{where}: {back} cannot resume at block {j} of stage {stage}")
        dims = (a.stages[stage][0].conv.out_channels, b.stages[stage][0].conv.out_channels)
        self.add_stitch(front, _block_index(a, stage, i) + 1, back, _block_index(b, stage, j),
                        nn.Conv2d(*dims, kernel_size=1, bias=True))


def evaluate(model: SNNet, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Held-out top-1 of every config (the model's current config is kept)."""
    current, top1 = model.config, {}
    with _eval_mode(model):
        for name in model.config_names():
            model.set_config(name)
            top1[name] = _top1(model, x, y)
    model.set_config(current)
    return top1


def _joint_train(
    model: SNNet,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    gen: torch.Generator,
    progress: bool,
    corruption: str | None,
    distill: float = 0.0,
    freeze_bn: bool = False,
) -> None:
    """The paper's joint training: each step one config, uniformly sampled (anchors included), updates all
    it runs, anchors too ("fulltune"). AdamW with a one-cycle schedule, the anchors' augmentation.

    `freeze_bn` keeps every BatchNorm's running statistics at the anchors' own (BN layers in eval mode; their
    affine weights still train), so the stitched configs' activations do not shift the statistics the
    anchors' shared layers normalise by. `distill` > 0 adds in-place distillation (as slimmable networks
    and BigNAS train their sub-networks): a step of any config but the largest anchor is scored
    `(1 - distill) * CE + distill * KL(student || largest anchor's softmax on the same batch)`, the teacher
    run without gradients."""
    if epochs == 0:
        return
    r, names = RECIPE, model.config_names()
    steps_per_epoch = math.ceil(len(y) / r["batch_size"])
    opt = torch.optim.AdamW(model.parameters(), lr=SNNET_RECIPE["lr"], weight_decay=r["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=SNNET_RECIPE["lr"], epochs=epochs, steps_per_epoch=steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=r["label_smoothing"])
    largest = names[-1]
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    for _ in tqdm(range(epochs), desc="snnet joint", disable=not progress):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(order), r["batch_size"]):
            batch = order[i : i + r["batch_size"]]
            name = names[int(torch.randint(len(names), (1,), generator=gen))]
            images = augment(x[batch], corruption, gen)
            teacher = None
            if distill > 0 and name != largest:
                model.set_config(largest)
                with torch.no_grad():
                    teacher = torch.softmax(model(images), dim=1)
            model.set_config(name)
            logits = model(images)
            loss = loss_fn(logits, y[batch])
            if teacher is not None:
                kd = nn.functional.kl_div(torch.log_softmax(logits, dim=1), teacher, reduction="batchmean")
                loss = (1 - distill) * loss + distill * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def train_snnet_digits(
    anchors: Sequence[str] = ("s050", "s100"),
    *,
    image_size: int = 32,
    epochs: int = SNNET_RECIPE["epochs"],
    seed: int = 0,
    progress: bool = True,
    anchor_epochs: int = SNNET_RECIPE["anchor_epochs"],
    corruption: str | None = "corrupted",
    distill: float = SNNET_RECIPE["distill"],
    freeze_bn: bool = SNNET_RECIPE["freeze_bn"],
) -> tuple[SNNet, dict]:
    """Train the anchors on the digits (`corruption`: a key of `digits.CORRUPTIONS`, None for the clean
    images), stitch them (least squares, then `epochs` of joint training), and score every config on the
    held-out split: {"metric", "direction", "data", "configs": [{"name", "value", "flops", "param_bytes",
    "value_ls_init", "ls_error"}, ...] small -> large, "train_seconds" (all of it), ...}.
    Returns the model in eval() mode, set to its largest anchor."""
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    start = time.perf_counter()
    nets, anchor_top1 = [], {}
    for variant in anchors:
        net, result = train_starnet_digits(
            variant,
            image_size=image_size,
            epochs=anchor_epochs,
            seed=seed,
            progress=progress,
            corruption=corruption,
        )
        nets.append(net)
        anchor_top1[variant] = result["value"]
    anchor_seconds = time.perf_counter() - start
    model = SNNet(nets, image_size=image_size)
    data = load_digits_images(image_size, seed, corruption)
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in data)

    r, s = RECIPE, SNNET_RECIPE
    threads_before = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(r["threads"])
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    try:
        order = torch.randperm(len(y_train), generator=gen)[: s["ls_images"]]
        # the stitches map activations of the images the joint training sees: corrupted ones, if corrupted
        init_images = augment(x_train[order], corruption, gen) if corruption else x_train[order]
        ls_errors = lstsq_init(model, init_images, ridge=s["ridge"])
        ls_top1 = evaluate(model, x_test, y_test)
        _joint_train(model, x_train, y_train, epochs, gen, progress, corruption, distill, freeze_bn)
        model.eval()
        names = model.config_names()
        model.set_config(names[-1])
        top1 = evaluate(model, x_test, y_test)
        stats = config_stats(model, x_test[:1])
    finally:
        torch.set_num_threads(threads_before)
    train_seconds = time.perf_counter() - start
    configs = [
        {"name": n, "value": top1[n], **stats[n], "value_ls_init": ls_top1[n], "ls_error": ls_errors.get(n)}
        for n in names
    ]
    for c in configs:
        log.info("snnet %s: top1 %.4f (ls init %.4f), %d FLOPs", c["name"], c["value"], c["value_ls_init"],
                 c["flops"])
    low, high = sorted((top1[names[0]], top1[names[-1]]))
    off = [n for n in names[1:-1] if not low - OFF_CURVE <= top1[n] <= high + OFF_CURVE]
    if off:
        log.warning("snnet configs %s fall more than %.2f outside the anchors' top-1 [%.4f, %.4f]: the "
                    "stitched configs do not interpolate; train longer (epochs)", off, OFF_CURVE, low, high)
    result = {
        "metric": f"top1 on {data_name(corruption)}",
        "direction": "higher",
        "data": data_name(corruption),
        "corruption": corruption,
        "test_images": len(y_test),
        "configs": configs,
        "train_seconds": train_seconds,
        "anchor_seconds": anchor_seconds,
        "anchor_top1": anchor_top1,
        "epochs": epochs,
        "anchor_epochs": anchor_epochs,
        "distill": distill,
        "freeze_bn": freeze_bn,
        "image_size": image_size,
    }
    return model, result
