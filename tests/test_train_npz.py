"""`edgeflex train dress|stitch --npz`: the user's models (their own file, FILE.py:FUNCTION, weights from a
state_dict .npz) made elastic on a .npz of their data from the command line, exported and run; every bad
file, key, shape and model spec ends in one line before any training.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_stitch import one_thread  # noqa: F401 - autouse: torch on one thread, as test_stitch

import edgeflex as ef
from edgeflex.cli import main
from edgeflex.models.digits import load_digits_images

USER_MODELS = '''
from torch import nn
from authors_starnet import StarNet          # StarNet as its authors publish it (tests/authors_starnet.py)

def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 10))

def small():
    return StarNet(8, [1, 1, 2, 1], 2, num_classes=10)

def large():
    return StarNet(12, [1, 1, 2, 1], 3, num_classes=10)

def broken():
    raise RuntimeError("no GPU here")
'''


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    """The user's folder: models.py, an MLP's weights, the 8x8 digits as grey (dress) and RGB (stitch)."""
    root = tmp_path_factory.mktemp("user")
    (root / "models.py").write_text(USER_MODELS)
    x_train, y_train, x_val, y_val = load_digits_images(8, seed=0)
    np.savez(root / "grey.npz", x_train=x_train[:, :1], y_train=y_train, x_val=x_val[:, :1], y_val=y_val)
    np.savez(root / "rgb.npz", x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    np.savez(root / "mlp.npz", **{k: v.numpy() for k, v in mlp.state_dict().items()})
    return root


def test_train_dress_from_a_npz_and_the_users_model_file_exports_a_bundle_that_runs(user, capsys) -> None:
    out = user / "d.efx"
    assert main(["train", "dress", "--npz", str(user / "grey.npz"), "--model", f"{user / 'models.py'}:mlp",
                 "--weights", str(user / "mlp.npz"), "--epochs", "1", "--densities", "1,0.5,0.25",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "trained on 1437 rows" in text and "density 0.25: val top-1" in text
    rt = ef.Runtime(out)
    assert [c.name for c in rt.configs] == ["density-100", "density-50", "density-25"]
    x_val = np.load(user / "grey.npz")["x_val"]
    assert rt.run(x_val[:3]).shape == (3, 10)


def test_train_stitch_from_a_npz_stitches_the_authors_starnets(user, capsys) -> None:
    out = user / "s.efx"
    models = user / "models.py"
    assert main(["train", "stitch", "--npz", str(user / "rgb.npz"), "--anchor", f"{models}:small",
                 "--anchor", f"{models}:large", "--stitches", "1", "--epochs", "1", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    names = [c.name for c in ef.Bundle.open(out).configs]
    assert names[0] == "a0" and names[-1] == "a1" and len(names) == 3


def test_bad_files_keys_shapes_and_model_specs_end_in_one_line(user, capsys, tmp_path: Path) -> None:
    models, grey = f"{user / 'models.py'}", str(user / "grey.npz")
    arrays = dict(np.load(grey))

    def npz(name: str, **change) -> str:
        path = tmp_path / f"{name}.npz"
        np.savez(path, **{k: v for k, v in {**arrays, **change}.items() if v is not None})
        return str(path)

    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really")
    cases = [
        (["--npz", npz("nokey", y_val=None)], r"no array y_val"),
        (["--npz", npz("rows", y_train=arrays["y_train"][:10])], r"x_train has 1437 rows, y_train 10"),
        (["--npz", npz("rank", y_val=arrays["y_val"][:, None])], r"y_val has shape \(360, 1\); expected 1-D"),
        (["--npz", npz("objects", x_val=np.array([None] * 360, dtype=object))], r"Python objects"),
        (["--npz", str(tmp_path / "junk.npz")], r"not a readable \.npz"),
        (["--npz", npz("nan", x_train=np.where(np.arange(1437)[:, None, None, None] == 7, np.nan,
                                               arrays["x_train"]))], r"x_train has 1 rows with NaN.*row 7"),
        (["--npz", npz("labels", y_val=arrays["y_val"] + 10)], r"y_val has labels in \[10, 19\]"),
        (["--npz", grey, "--model", f"{models}:nope"], r"has no function 'nope'"),
        (["--npz", grey, "--model", f"{models}:broken"], r"calling it failed: RuntimeError: no GPU here"),
        (["--npz", grey, "--model", "models:mlp"], r"expected FILE\.py:FUNCTION"),
        (["--npz", grey, "--weights", grey], r"do not fit .*missing \['1\.bias'"),
    ]
    for extra, pattern in cases:
        args = ["train", "dress", "--model", f"{models}:mlp", "--out", str(tmp_path / "x.efx"), *extra]
        assert main(args) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(pattern, err), (pattern, err)
    assert not (tmp_path / "x.efx").exists()
    assert main(["train", "stitch", "--npz", grey, "--anchor", f"{models}:small", "--out",
                 str(tmp_path / "y.efx")]) == 2
    assert "two or more --anchor" in capsys.readouterr().err
