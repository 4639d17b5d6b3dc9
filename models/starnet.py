"""StarNet ("Rewrite the Stars", Ma et al., CVPR 2024): its blocks, the network and its named variants.

Owns the PyTorch definition only; training lives in `models/digits.py`, export and running elsewhere.
Written from the paper and github.com/ma-xu/Rewrite-the-Stars `imagenet/starnet.py`, without timm.
"""

from __future__ import annotations

import torch
from torch import nn

# name -> constructor settings, as in upstream `starnet_<name>()` (HEAD of ma-xu/Rewrite-the-Stars).
STARNET_VARIANTS: dict[str, dict] = {
    "s050": {"base_dim": 16, "depths": (1, 1, 3, 1), "mlp_ratio": 3},
    "s100": {"base_dim": 20, "depths": (1, 2, 4, 1), "mlp_ratio": 4},
    "s150": {"base_dim": 24, "depths": (1, 2, 4, 2), "mlp_ratio": 3},
    "s1": {"base_dim": 24, "depths": (2, 2, 8, 3), "mlp_ratio": 4},
    "s2": {"base_dim": 32, "depths": (1, 2, 6, 2), "mlp_ratio": 4},
    "s3": {"base_dim": 32, "depths": (2, 2, 8, 4), "mlp_ratio": 4},
    "s4": {"base_dim": 32, "depths": (3, 3, 12, 5), "mlp_ratio": 4},
}

# Parameters in millions (num_classes=1000, in_chans=3) as published, to the published rounding. S1-S4: the
# upstream imagenet/README.md table. S050/S100/S150: the paper's table of very small networks; NOTE: these
# three were not re-read from a copy of the paper here; the upstream definitions count 0.543/1.043/1.561 M.
PAPER_PARAMS_M: dict[str, float] = {
    "s050": 0.54,
    "s100": 1.04,
    "s150": 1.56,
    "s1": 2.9,
    "s2": 3.7,
    "s3": 5.8,
    "s4": 7.5,
}

STEM_CHANNELS = 32


class ConvBN(nn.Sequential):
    """Conv2d (with bias, as upstream) optionally followed by BatchNorm2d."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        with_bn: bool = True,
    ) -> None:
        super().__init__()
        self.add_module(
            "conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups)
        )
        if with_bn:
            self.add_module("bn", nn.BatchNorm2d(out_channels))
            nn.init.ones_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """dwconv7x7+BN -> star op relu6(f1(x)) * f2(x) -> g 1x1+BN -> dwconv7x7, plus the residual."""

    def __init__(self, dim: int, mlp_ratio: int = 3, drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = mlp_ratio * dim
        self.dwconv = ConvBN(dim, dim, 7, 1, 3, groups=dim, with_bn=True)
        self.f1 = ConvBN(dim, hidden, 1, with_bn=False)
        self.f2 = ConvBN(dim, hidden, 1, with_bn=False)
        self.g = ConvBN(hidden, dim, 1, with_bn=True)
        self.dwconv2 = ConvBN(dim, dim, 7, 1, 3, groups=dim, with_bn=False)
        self.act = nn.ReLU6()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x)
        y = self.act(self.f1(y)) * self.f2(y)
        return x + self.drop_path(self.dwconv2(self.g(y)))


class StarNet(nn.Module):
    """Stem, four down-sampling stages of star blocks, BatchNorm, global average pool and a linear head."""

    family = "starnet"

    def __init__(
        self,
        base_dim: int,
        depths: tuple[int, ...] | list[int],
        mlp_ratio: int,
        drop_path_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        variant: str | None = None,
    ) -> None:
        super().__init__()
        self.variant = variant
        self.num_classes = num_classes
        self.stem = nn.Sequential(ConvBN(in_chans, STEM_CHANNELS, 3, 2, 1), nn.ReLU6())
        # stochastic depth grows linearly over all blocks of the network
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        channels, first = STEM_CHANNELS, 0
        for i, depth in enumerate(depths):
            dim = base_dim * 2**i
            blocks = [Block(dim, mlp_ratio, rates[first + j]) for j in range(depth)]
            self.stages.append(nn.Sequential(ConvBN(channels, dim, 3, 2, 1), *blocks))
            channels, first = dim, first + depth
        self.num_features = channels
        self.norm = nn.BatchNorm2d(channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # NOTE: upstream writes `isinstance(m, nn.Linear or nn.Conv2d)`, which only matches Linear; we follow
        # the evident intent (as timm does): trunc-normal conv weights too, biases zero, BatchNorm 1 / 0.
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.avgpool(self.forward_features(x)), 1))


def list_variants() -> list[str]:
    """Names accepted by `starnet()`, smallest first."""
    return list(STARNET_VARIANTS)


def starnet(
    variant: str, *, num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0
) -> StarNet:
    """Build the named StarNet variant (see `STARNET_VARIANTS`), untrained."""
    if variant not in STARNET_VARIANTS:
        raise ValueError(
            f"unknown StarNet variant {variant!r}; expected one of {list_variants()} "
            "(add new ones to STARNET_VARIANTS)"
        )
    return StarNet(
        **STARNET_VARIANTS[variant],
        drop_path_rate=drop_path_rate,
        num_classes=num_classes,
        in_chans=in_chans,
        variant=variant,
    )
