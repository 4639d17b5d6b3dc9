"""`ef.elastic.dress` on the user's own models and data: an MLP and a CNN written here in plain PyTorch (no
edgeflex class), pre-trained briefly on the 8x8 digits, made nested-sparse, fine-tuned for an epoch or two,
exported and run through `Runtime` with every level equal to PyTorch; bad data and bad settings end in one
line before any training.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from test_stitch import one_thread  # noqa: F401 - autouse: torch on one thread, as test_stitch
from test_stitch import train_briefly as pretrain
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import edgeflex as ef
from edgeflex.models.digits import load_digits_images


@pytest.fixture(scope="module")
def digits8() -> tuple[np.ndarray, ...]:
    x_train, y_train, x_val, y_val = load_digits_images(8, seed=0)
    return x_train[:, :1], y_train, x_val[:, :1], y_val          # one grey channel, 8x8


def user_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(),
                         nn.Linear(96, 10))


class UserCNN(nn.Module):
    """A small CNN as a user writes one: 3x3 convs with BatchNorm, a strided one, a 1x1, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 1), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.stem(x)).mean((2, 3)))


class UserTokenMixer(nn.Module):
    """ViT-like: the 8 rows of a digit as tokens, Linear layers on [batch, tokens, channels] (captured as
    MatMul by a transposed copy of the weight), LayerNorm, a residual, mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mix, self.norm, self.head = nn.Linear(8, 32), nn.Linear(32, 32), nn.LayerNorm(32), \
            nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x.reshape(-1, 8, 8))
        return self.head((t + torch.relu(self.mix(self.norm(t)))).mean(1))


class UserCNNTwoLayerHead(UserCNN):
    """The CNN with a two-layer classifier head: prunable convs and a prunable Linear (a Gemm) in one model;
    the row-sparse graph once rewrote the Gemm alone and ran the convs dense at every level."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10))


class UserEncoder(nn.Module):
    """A transformer as PyTorch's docs write one (nn.TransformerEncoder, batch first): its attention's
    out_proj is a Gemm, its feed-forward Linears on tokens are MatMuls."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
                                         1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.embed(x.reshape(-1, 8, 8))).mean(1))


def same_as_pytorch(model: ef.elastic.DressModel, path, x: np.ndarray) -> ef.Runtime:
    """Every level of the bundle at `path` on ONNX Runtime equals the model at that level (<= 1e-4)."""
    rt = ef.Runtime(path)
    assert [c.name for c in rt.configs] == [f"density-{round(d * 100)}" for d in model.levels]
    for s, c in enumerate(rt.configs):
        rt.switch(c.name)
        with torch.no_grad():
            ref = model.set_level(s)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(rt.run(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        assert c.quality["value"] == model.quality[s]["value"] and c.quality["split"] == "val"
    model.set_level(0)
    return rt


@pytest.mark.parametrize("make", [user_mlp, UserCNN, UserTokenMixer], ids=["mlp", "cnn", "tokens"])
def test_users_model_becomes_dress_exported_and_every_level_equals_pytorch(make, digits8, tmp_path):
    x_train, y_train, x_val, y_val = digits8
    torch.manual_seed(0)
    user = pretrain(make(), x_train, y_train, steps=80)   # the user's own pre-training, in miniature
    before = {k: v.clone() for k, v in user.state_dict().items()}
    dm = ef.elastic.dress(user, (x_train, y_train), (x_val, y_val), epochs=2, progress=False)
    assert all(torch.equal(v, user.state_dict()[k]) for k, v in before.items())     # theirs, untouched
    first_conv = [n for n, m in user.named_modules() if isinstance(m, nn.Conv2d)][:1]
    last_linear = [n for n, m in user.named_modules() if isinstance(m, nn.Linear)][-1]
    assert f"{last_linear}.weight" not in dm.prunable_names
    assert not first_conv or f"{first_conv[0]}.weight" not in dm.prunable_names
    levels = dm.report["levels"]
    assert [lv["density"] for lv in levels] == [1.0, 0.5, 0.25, 0.1]
    assert all(a["flops"] > b["flops"] for a, b in zip(levels, levels[1:]))
    assert levels[0]["value"] > 0.4 and levels[-1]["value"] > 0.1     # level 0 far above chance (0.1)
    assert levels[-1]["value"] > levels[-1]["value_before"]     # fine-tuning recovers the sparsest level
    bundle = ef.export(dm, torch.from_numpy(x_val[:2]), tmp_path / "d.efx")
    assert bundle.family == "dress" and len(bundle.configs) == 4
    same_as_pytorch(dm, tmp_path / "d.efx", x_val[:64])


@pytest.mark.parametrize("make", [UserCNNTwoLayerHead, UserEncoder], ids=["cnn-mlp-head", "transformer"])
def test_a_model_with_gemm_and_other_prunable_layers_exports_every_level_equal_to_pytorch(make, digits8,
                                                                                         tmp_path):
    # some prunable layers are Gemms (the row-sparse kernel's), others convs or MatMuls: the export failed
    # its own check (the row-sparse graph ran the others dense at every level); now every level matches
    x_train, y_train, x_val, y_val = digits8
    torch.manual_seed(0)
    user = pretrain(make(), x_train, y_train, steps=40)
    dm = ef.elastic.dress(user, (x_train, y_train), (x_val, y_val), epochs=1, progress=False)
    kinds = {type(user.get_submodule(n.removesuffix(".weight"))) for n in dm.prunable_names}
    assert nn.Linear in kinds or any(issubclass(k, nn.Linear) for k in kinds)
    ef.export(dm, torch.from_numpy(x_val[:2]), tmp_path / "d.efx")
    same_as_pytorch(dm, tmp_path / "d.efx", x_val[:64])


def test_dataloader_and_custom_densities_and_predicate(digits8, tmp_path):
    x_train, y_train, x_val, y_val = digits8
    torch.manual_seed(0)
    user = pretrain(user_mlp(), x_train, y_train, steps=20)
    loader = DataLoader(TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train)), batch_size=128)
    dm = ef.elastic.dress(user, loader, (x_val, y_val), densities=(1.0, 0.3), epochs=1, progress=False,
                          prunable=lambda _, name, m: isinstance(m, nn.Linear) and name == "3")
    assert dm.prunable_names == ["3.weight"] and dm.levels == [1.0, 0.3]
    ef.export(dm, torch.from_numpy(x_val[:2]), tmp_path / "d2.efx")
    same_as_pytorch(dm, tmp_path / "d2.efx", x_val[:16])


def _bad(digits8, case: str):
    x_train, y_train, x_val, y_val = (a.copy() for a in digits8)
    if case == "nan":
        x_train[5, 0, 2, 2] = np.nan
    elif case == "labels":
        y_val[3] = 12
    elif case == "few":
        x_train, y_train = x_train[:10], y_train[:10]
    elif case == "shape":
        x_val = x_val[:, :, :4]
    elif case == "dtype":
        x_train = x_train.astype(np.int64)
    return (x_train, y_train), (x_val, y_val)


@pytest.mark.parametrize("case,pattern", [
    ("nan", r"x_train has 1 rows with NaN or inf \(first: row 5\)"),
    ("labels", r"y_val has labels in \[0, 12\] but the models have 10 outputs"),
    ("few", r"train data has 10 rows; expected at least 64"),
    ("shape", r"x_val rows have shape \(1, 4, 8\); expected \(1, 8, 8\)"),
    ("dtype", r"x_train has dtype int64; expected floating point"),
])
def test_bad_data_is_one_line_before_training(digits8, case, pattern, monkeypatch):
    from edgeflex.models import dress as dress_module
    monkeypatch.setattr(dress_module, "joint_loss", lambda *a: pytest.fail("trained on bad data"))
    train, val = _bad(digits8, case)
    with pytest.raises(ef.DataError, match=pattern) as e:
        ef.elastic.dress(user_mlp(), train, val, epochs=1, progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw,pattern", [
    ({"densities": (1.0, 0.5, 0.25, 0.1, 0.05)}, "at most 4 levels"),
    ({"densities": (0.5, 0.25)}, "densities must start at 1.0"),
    ({"loss_weights": (1.0, 0.0)}, "one weight >= 0 per level"),
    ({"epochs": 0}, "epochs must be an int >= 1"),
])
def test_bad_settings_are_one_line(digits8, kw, pattern):
    x_train, y_train, x_val, y_val = digits8
    with pytest.raises(ef.UsageError, match=re.escape(pattern)):
        ef.elastic.dress(user_mlp(), (x_train, y_train), (x_val, y_val), progress=False, **kw)


def test_model_without_prunable_layers_or_logits_is_refused(digits8):
    x_train, y_train, x_val, y_val = digits8
    with pytest.raises(ef.UsageError, match="no prunable layer in Sequential"):
        ef.elastic.dress(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), (x_train, y_train), (x_val, y_val),
                         progress=False)
    with pytest.raises(ef.UsageError, match=r"expected logits of shape \(batch, classes\)"):
        ef.elastic.dress(nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Flatten(0)), (x_train, y_train),
                         (x_val, y_val), progress=False)
