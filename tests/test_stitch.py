"""`ef.elastic.stitch` on the user's own anchors and data: StarNets written as their authors publish them
(tests/authors_starnet.py, no edgeflex class) and an adapter-described pair of token mixers, each pair trained
briefly on the digits, stitched, exported as shared segments and run through `Runtime` with every config
equal to PyTorch; every bad-data case ends in one DataError line before any training.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from authors_starnet import StarNet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import edgeflex as ef
from edgeflex.models import stitch as stitch_module
from edgeflex.models.digits import load_digits_images

ANCHOR_STEPS = 60            # per anchor: enough to learn the digits well above chance, a few seconds


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_briefly(net: nn.Module, x: np.ndarray, y: np.ndarray, steps: int = ANCHOR_STEPS) -> nn.Module:
    """The user's own pre-training, in miniature: AdamW, one-cycle, random batches of 64."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(net.parameters(), lr=4e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(yt), (64,), generator=gen)
        loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def runs_like_pytorch(model: ef.elastic.Stitched, path: Path, x: np.ndarray) -> ef.Runtime:
    """Every config of the bundle at `path` on ONNX Runtime equals the model in that config (<= 1e-4)."""
    rt = ef.Runtime(path)
    assert [c.name for c in rt.configs] == model.config_names()
    for c in rt.configs:
        rt.switch(c.name)
        model.set_config(c.name)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(rt.run(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        assert c.quality["value"] == model.quality[c.name]["value"] and c.quality["split"] == "val"
    return rt


# --- StarNet as its authors publish it ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits16() -> tuple[np.ndarray, ...]:
    return load_digits_images(16, seed=0)          # x_train (1437, 3, 16, 16), y_train, x_val, y_val


@pytest.fixture(scope="module")
def starnets(digits16) -> ef.elastic.Stitched:
    x_train, y_train, x_val, y_val = digits16
    torch.manual_seed(0)
    small = train_briefly(StarNet(8, [1, 1, 2, 1], 2, num_classes=10), x_train, y_train)
    large = train_briefly(StarNet(12, [1, 1, 3, 1], 3, num_classes=10), x_train, y_train)
    return ef.elastic.stitch([small, large], (x_train, y_train), (x_val, y_val), epochs=1, stitches=2,
                             progress=False)


def test_the_authors_starnets_stitch_into_configs_ordered_by_flops(starnets) -> None:
    names = starnets.config_names()
    assert names[0] == "a0" and names[-1] == "a1" and len(names) == 4
    # Slow-to-Fast: the larger anchor in front, named where each side leaves and resumes
    for name in names[1:-1]:
        assert re.fullmatch(r"a1\.s\d(down|b\d)-a0\.s\d(down|b\d)", name), name
        assert isinstance(starnets.stitches[name.replace(".", "_")], nn.Conv2d)
    report = {c["name"]: c for c in starnets.report["configs"]}
    flops = [report[n]["flops"] for n in names]
    assert flops == sorted(flops) and len(set(flops)) == len(flops)
    for name in ("a0", "a1"):     # the anchors learnt the digits in their brief pre-training
        assert report[name]["value_before"] > 0.5 and report[name]["value"] > 0.5
    for name in names[1:-1]:
        assert 0 < report[name]["ls_error"] < 1 and 0 <= report[name]["value"] <= 1
    assert set(starnets.quality) == set(names) and starnets.report["val_rows"] == 360
    assert ef.models.place(starnets).name == "snnet" and starnets.config == "a1" and not starnets.training


def test_the_stitched_starnets_export_as_shared_segments_and_every_config_runs_like_pytorch(
        starnets, digits16, tmp_path: Path) -> None:
    x_val = digits16[2]
    bundle = ef.export(starnets, torch.from_numpy(x_val[:2]), tmp_path / "sn.efx")
    runs_like_pytorch(starnets, tmp_path / "sn.efx", x_val[:7])
    assert [c.flops for c in bundle.configs] == [c["flops"] for c in starnets.report["configs"]]
    weights = bundle.manifest["files"]["weights.bin"]["bytes"]
    params = 4 * sum(p.numel() for p in starnets.parameters())
    assert weights <= 1.1 * params, "the anchors' weights are stored once, however many configs use them"


def test_a_model_not_laid_out_like_starnet_is_told_to_pass_an_adapter(digits8) -> None:
    x_train, y_train, x_val, y_val = digits8
    with pytest.raises(ef.UsageError, match=r"not laid out like StarNet.*adapter=") as e:
        ef.elastic.stitch([Mixer(8, 1), Mixer(16, 2)], (x_train, y_train), (x_val, y_val), progress=False)
    assert "\n" not in str(e.value)


# --- a non-StarNet pair described by an adapter: token mixers, stitched by linear layers --------------------

class MixerBlock(nn.Module):
    def __init__(self, width: int, tokens: int = 8) -> None:
        super().__init__()
        self.norm1, self.token_mix = nn.LayerNorm(width), nn.Linear(tokens, tokens)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mix(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp(self.norm2(x))


class Mixer(nn.Module):
    """A user's classifier of 8x8 digits read as 8 row tokens of 8 pixels: (B, 8, 8) -> (B, 10)."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.blocks = nn.ModuleList(MixerBlock(width) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


class MixerHead(nn.Module):
    """What Mixer.forward runs after its blocks, as one module."""

    def __init__(self, m: Mixer) -> None:
        super().__init__()
        self.norm, self.head = m.norm, m.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x).mean(1))


def mixer_layout(m: Mixer) -> ef.elastic.Layout:
    return ef.elastic.Layout(before=m.embed, blocks=list(m.blocks), after=MixerHead(m))


@pytest.fixture(scope="module")
def digits8() -> tuple[np.ndarray, ...]:
    return tuple(a[:, 0] if a.ndim == 4 else a for a in load_digits_images(8, seed=0))   # x: (N, 8, 8)


@pytest.fixture(scope="module")
def mixers(digits8) -> list[Mixer]:
    x_train, y_train, _, _ = digits8
    torch.manual_seed(0)
    return [train_briefly(Mixer(16, 3), x_train, y_train), train_briefly(Mixer(32, 4), x_train, y_train)]


def test_an_adapter_described_pair_stitches_tokens_from_a_dataloader_and_runs_like_pytorch(
        mixers, digits8, tmp_path: Path) -> None:
    x_train, y_train, x_val, y_val = digits8
    loader = DataLoader(TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train)), batch_size=64,
                        shuffle=True, generator=torch.Generator().manual_seed(0))
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in mixers]
    model = ef.elastic.stitch(mixers, loader, (x_val, y_val), adapter=mixer_layout, names=["narrow", "wide"],
                              direction="fast-to-slow", stitches=2, epochs=1, progress=False)
    names = model.config_names()
    assert (names[0], names[-1], len(names)) == ("narrow", "wide", 4)
    for name in names[1:-1]:      # Fast-to-Slow, the paper's: the small anchor in front
        assert re.fullmatch(r"narrow\.b\d-wide\.b\d", name), name
        assert isinstance(model.stitches[name.replace(".", "_")], nn.Linear)
    assert model.report["train_rows"] == len(y_train)
    assert model.quality["narrow"]["value"] > 0.5 and model.quality["wide"]["value"] > 0.5
    for m, state in zip(mixers, before, strict=True):      # joint training tuned copies, not the user's
        assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    ef.export(model, torch.from_numpy(x_val[:2]), tmp_path / "mix.efx")
    runs_like_pytorch(model, tmp_path / "mix.efx", x_val[:5])


def test_anchors_of_equal_depth_stitch_block_for_block_as_in_the_paper() -> None:
    torch.manual_seed(0)
    model = stitch_module.build([Mixer(8, 4), Mixer(16, 4)], torch.randn(2, 8, 8), adapter=mixer_layout,
                                direction="both", stitches=None)
    stitched = sorted(n for n in model.config_names() if n not in ("a0", "a1"))
    # the front runs blocks 0..i, the back resumes at block i + 1; never at the head alone
    pairs = (("a0", "a1"), ("a1", "a0"))
    assert stitched == sorted(f"{f}.b{i}-{b}.b{i + 1}" for f, b in pairs for i in range(3))


class ForgetsThePool(nn.Module):
    def __init__(self, m: Mixer) -> None:
        super().__init__()
        self.norm, self.head = m.norm, m.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x)[:, 0])       # not what Mixer.forward does


@pytest.mark.parametrize("adapter, message", [
    (lambda m: ef.elastic.Layout(m.embed, list(m.blocks), ForgetsThePool(m)), "differs from its forward"),
    (lambda m: ef.elastic.Layout(m.embed, list(m.blocks)[1:], MixerHead(m)), "differs from its forward"),
    (lambda m: ef.elastic.Layout(m.embed, list(m.blocks), m.head), "its layout gives shape"),
    (lambda m: (m.embed, m.blocks, m.head), "expected a Layout"),
])
def test_an_adapter_that_does_not_reproduce_forward_is_refused_in_one_line(mixers, digits8, adapter,
                                                                           message) -> None:
    x_train, y_train, x_val, y_val = digits8
    with pytest.raises(ef.UsageError, match=message) as e:
        ef.elastic.stitch(mixers, (x_train, y_train), (x_val, y_val), adapter=adapter, progress=False)
    assert "\n" not in str(e.value)


# --- bad data: one line, before anything trains ------------------------------------------------------------

def _loader(x: np.ndarray, y: np.ndarray) -> DataLoader:
    return DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=32)


def _nan_row(x: np.ndarray, row: int) -> np.ndarray:
    x = x.copy()
    x[row, 3, 2] = np.nan
    return x


BAD_DATA = {   # case: (train, val) from (x, y, x_val, y_val) -> what the one line says
    "x and y differ in rows": (lambda x, y, xv, yv: ((x, y[:-1]), (xv, yv)), r"x_train has 1437 rows but "
                               r"y_train has 1436"),
    "val rows of another shape": (lambda x, y, xv, yv: ((x, y), (xv[:, :, :7], yv)),
                                  r"x_val rows have shape \(8, 7\); expected \(8, 8\)"),
    "labels as a column": (lambda x, y, xv, yv: ((x, y[:, None]), (xv, yv)), r"pass y.reshape\(-1\)"),
    "labels out of range": (lambda x, y, xv, yv: ((x, y), (xv, np.where(yv == 9, 10, yv))),
                            r"y_val has labels in \[0, 10\] but the models have 10 outputs"),
    "negative labels": (lambda x, y, xv, yv: ((x, y - 1), (xv, yv)), r"y_train has negative labels"),
    "float labels": (lambda x, y, xv, yv: ((x, y.astype(np.float32)), (xv, yv)), r"y.astype\(np.int64\)"),
    "integer inputs": (lambda x, y, xv, yv: ((x.astype(np.int32), y), (xv, yv)), r"x.astype\(np.float32\)"),
    "a NaN row": (lambda x, y, xv, yv: ((_nan_row(x, 17), y), (xv, yv)),
                  r"x_train has 1 rows with NaN or inf \(first: row 17\)"),
    "too few rows": (lambda x, y, xv, yv: ((x[:20], y[:20]), (xv, yv)),
                     r"train data has 20 rows; expected at least 64"),
    "too few val rows": (lambda x, y, xv, yv: ((x, y), (xv[:5], yv[:5])), r"val data has 5 rows"),
    "not a pair": (lambda x, y, xv, yv: ({"x": x, "y": y}, (xv, yv)), r"train data is dict; expected"),
    "a NaN row from a DataLoader": (lambda x, y, xv, yv: (_loader(_nan_row(x, 70), y), (xv, yv)),
                                    r"first: row 70\)"),
    "too few rows from a DataLoader": (lambda x, y, xv, yv: ((x, y), _loader(xv[:10], yv[:10])),
                                       r"val DataLoader gave 10 rows; expected at least 16"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_refused_in_one_line_before_any_training(case: str, mixers, digits8,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*_, **__):
        raise AssertionError("stitching started on bad data")

    monkeypatch.setattr(stitch_module, "build", never)
    monkeypatch.setattr(stitch_module, "joint_train", never)
    make, message = BAD_DATA[case]
    train, val = make(*digits8)
    with pytest.raises(ef.DataError, match=message) as e:
        ef.elastic.stitch(mixers, train, val, adapter=mixer_layout, progress=False)
    assert "\n" not in str(e.value)


class _PatchEmbed(nn.Module):
    """DeiT's front, in miniature: 2x2 patches, a class token, learnt positions."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, dim, 2, 2)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:      # x [B, 8, 8]: a grey digit
        t = self.proj(x.unsqueeze(1)).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos


class _ClsHead(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x)[:, 0])


class TinyViT(nn.Module):
    """A ViT as the paper stitches (DeiT: pre-norm encoder blocks, GELU, the class token's logits), built
    from PyTorch's nn.TransformerEncoderLayer as a user would."""

    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.embed = _PatchEmbed(dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True) for _ in range(depth))
        self.head = _ClsHead(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_vit_anchors_stitch_and_export_from_a_batch_1_example(digits8, tmp_path: Path) -> None:
    # from a batch-1 example the dynamo exporter fixed the batch of some segments and torchscript took
    # those: the fused graphs then merged segments of two IR versions and the export failed
    x_train, y_train, x_val, y_val = digits8
    torch.manual_seed(0)
    anchors = [train_briefly(TinyViT(16, 2, 2), x_train, y_train, steps=40),
               train_briefly(TinyViT(32, 3, 4), x_train, y_train, steps=40)]
    model = ef.elastic.stitch(anchors, (x_train, y_train), (x_val, y_val),
                              adapter=lambda m: ef.elastic.Layout(m.embed, list(m.blocks), m.head),
                              direction="fast-to-slow", epochs=1, progress=False)
    assert len(model.config_names()) >= 3
    bundle = ef.export(model, torch.from_numpy(x_val[:1]), tmp_path / "vit.efx")
    assert bundle.manifest["export"]["strategy"].endswith(" per segment")
    runs_like_pytorch(model, tmp_path / "vit.efx", x_val[:5])
