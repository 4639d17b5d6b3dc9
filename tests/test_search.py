"""`edgeflex search` / `ef.search`: per-layer combinations of a bundle's configs (SN-Net paths over three
user anchors that stitch twice; DRESS levels chosen per weight of a user MLP), scored on held-out data,
timed here, written into the bundle as configs that `Runtime` runs equal to PyTorch with no weight stored
again; the .npz reader's one-line errors.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_stitch import (
    Mixer,
    mixer_layout,
    one_thread,  # noqa: F401 - autouse: torch on one thread, as test_stitch
)
from test_stitch import train_briefly as pretrain
from torch import nn
from torch.func import functional_call

import edgeflex as ef
from edgeflex.cli import main
from edgeflex.datafile import load_npz
from edgeflex.export import search as search_module
from edgeflex.models.digits import load_digits_images
from edgeflex.models.stitch import segment_plan
from edgeflex.runtime.schema import check_manifest


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, ...]:
    return load_digits_images(8, seed=0)            # x (N, 3, 8, 8)


@pytest.fixture(scope="module")
def mixers3(digits, tmp_path_factory) -> tuple[ef.elastic.Stitched, Path, tuple]:
    x_train, y_train, x_val, y_val = digits
    x8, xv8 = x_train[:, 0], x_val[:, 0]
    torch.manual_seed(0)
    anchors = [pretrain(Mixer(w, d), x8, y_train) for w, d in ((8, 2), (16, 3), (32, 4))]
    model = ef.elastic.stitch(anchors, (x8, y_train), (xv8, y_val), adapter=mixer_layout, stitches=2,
                              epochs=1, progress=False)
    path = tmp_path_factory.mktemp("search") / "mix3.efx"
    ef.export(model, torch.from_numpy(xv8[:2]), path)
    return model, path, (xv8, y_val)


@pytest.fixture(scope="module")
def dress_mlp(digits, tmp_path_factory) -> tuple[ef.elastic.DressModel, Path, tuple]:
    x_train, y_train, x_val, y_val = digits
    xg, xvg = x_train[:, :1], x_val[:, :1]
    torch.manual_seed(0)
    mlp = pretrain(nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                                 nn.Linear(48, 10)), xg, y_train)
    dm = ef.elastic.dress(mlp, (xg, y_train), (xvg, y_val), epochs=1, progress=False)
    path = tmp_path_factory.mktemp("search") / "mlp.efx"
    ef.export(dm, torch.from_numpy(xvg[:2]), path)
    return dm, path, (xvg, y_val)


def copy_of(path: Path, tmp_path: Path) -> Path:
    out = tmp_path / path.name
    shutil.copytree(path, out)
    return out


def test_three_anchors_give_paths_that_stitch_twice_over_the_stored_segments(mixers3) -> None:
    model, path, _ = mixers3
    with ef.Bundle.open(path) as b:
        configs, files = search_module.snnet_space(b, max_stitches=3, max_candidates=64)
        segments = set(b.segments)
        protos = search_module._protos(b, list(segments))
        for c in b.configs:       # a chain's bytes and FLOPs, counted from its graphs, give the exporter's
            assert search_module._param_bytes([protos[s] for s in c.segments]) == c.param_bytes
            assert sum(b.manifest["segments"][s]["flops"] for s in c.segments) == c.flops
    assert configs, "a2 -> a1 -> a0 through two of the bundle's stitches"
    for c in configs:
        stitches = [s for s in c["segments"] if s.startswith("stitch.")]
        assert len(stitches) >= 2 and set(c["segments"]) <= segments
        assert c["name"] == "+".join(s.removeprefix("stitch.") for s in stitches)
        assert c["fused"]["graph"] in files and c["flops"] > 0
        assert c["costs"]["engine_calls"] == len(c["segments"])


def test_a_found_path_written_into_the_bundle_runs_like_pytorch_and_stores_no_weight_again(
        mixers3, tmp_path: Path) -> None:
    model, path, (x, y) = mixers3
    path = copy_of(path, tmp_path)
    weights_before = (path / "weights.bin").read_bytes()
    result = ef.search(path, (x, y), pareto_front=True, threads=1, write=False, progress=False)
    found = [p for p in result.points if p.new]
    assert found and all(0 <= p.quality <= 1 for p in found)
    # write one found path as the search writes its front's, then open and run it
    search_module.add(path, result, [found[0].name])
    assert (path / "weights.bin").read_bytes() == weights_before
    segments, _ = segment_plan(model)
    name, chain = found[0].name, found[0].config["segments"]
    with torch.no_grad():
        h = torch.from_numpy(x[:9])
        for seg in chain:
            h = segments[seg](h)
    for fused in (True, False):
        rt = ef.Runtime(path, fused=fused, threads=1)
        rt.switch(name)
        np.testing.assert_allclose(rt.run(x[:9]), h.numpy(), rtol=1e-4, atol=1e-4 * float(h.abs().max()))
    config = rt.bundle.config(name)
    assert config.quality["value"] == pytest.approx(found[0].quality)
    assert json.loads((path / "search" / "host.json").read_text())["added"] == [name]


def test_on_a_device_not_at_hand_the_latencies_are_predicted_and_say_so(mixers3, tmp_path: Path) -> None:
    _, path, (x, y) = mixers3
    result = ef.search(path, (x, y), device="rpi5", latency_ms=1000.0, threads=1, write=False,
                       progress=False)
    assert result.obtained == "predicted" and "UNVALIDATED" in result.predictor["note"]
    assert all(p.measured_ms is None and p.predicted_ms > 0 for p in result.points)
    best = max((p for p in result.points if not p.calibration_only), key=lambda p: (p.quality, -p.ms))
    assert result.added == ([best.name] if best.new else [])      # the best within 1 s, if it is new
    with pytest.raises(ef.UsageError, match="one of the two"):
        ef.search(path, (x, y), progress=False)


def test_dress_levels_chosen_per_weight_run_like_pytorch_and_the_search_adds_only_its_front(
        dress_mlp, tmp_path: Path) -> None:
    dm, path, (x, y) = dress_mlp
    path = copy_of(path, tmp_path)
    with ef.Bundle.open(path) as b:
        hand = {c.name: c.flops for c in b.configs}
        candidates, calibration = search_module.dress_space(b, max_candidates=64, seed=0)
    # the FLOPs of a mix, computed from the graph and the codes, give each level's own for uniform mixes
    assert {c["name"]: c["flops"] for c in calibration if "@" not in c["name"]} == hand
    with ef.Bundle.open(path) as b:
        hand_bytes = {c.name: c.param_bytes for c in b.configs}
    for c in calibration:         # the levels on the other kernel too: bytes as the exporter counts them
        assert c["param_bytes"] == hand_bytes[c["name"].partition("@")[0]]
    assert len({c["name"] for c in candidates}) == len(candidates) and len(candidates) == 2 * (4**2 - 4)
    result = ef.search(path, (x, y), pareto_front=True, threads=1, progress=False,
                       plot=tmp_path / "front.png")
    assert (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"
    scored = [p for p in result.points if not p.calibration_only]
    timed = [p for p in scored if not p.new or p.measured_ms is not None]      # the front is on measured ms
    assert all(p.measured_ms is not None for p in scored if p.name in result.front)
    for name in result.front:                 # nothing on the front is beaten by another point
        p = result.point(name)
        assert not any(q.quality > p.quality and q.ms < p.ms * 0.97 for q in timed)
    assert set(result.added) <= {p.name for p in scored if p.new} & set(result.front)
    rt = ef.Runtime(path, threads=1)
    assert [c.name for c in rt.configs][4:] == result.added
    # a per-weight mix, on both kernels, equals the backbone with each weight masked at its own level
    mix = {"1.weight": 0, "3.weight": 3}
    with ef.Bundle.open(path) as b:
        cfg = next(c for c in candidates if c["dress"]["layers"] == mix and c["dress"]["kernel"] == "sparse")
        cfg_dense = {**cfg, "name": "dense-mix", "dress": {**cfg["dress"], "kernel": "dense"}}
        staged = search_module._Staged(b, [cfg, cfg_dense], {})
        rt = ef.Runtime(staged, threads=1)
        weights = {k: torch.where(dm.codes[k] >= lv, dm.backbone.get_parameter(k), 0.0)
                   for k, lv in mix.items()}
        with torch.no_grad():
            ref = functional_call(dm.backbone.eval(), weights, (torch.from_numpy(x[:7]),)).numpy()
        for name in (cfg["name"], "dense-mix"):
            rt.switch(name)
            np.testing.assert_allclose(rt.run(x[:7]), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_the_search_command_line_refuses_bad_data_and_bundles_in_one_line(
        dress_mlp, tmp_path: Path, capsys) -> None:
    _, path, (x, y) = dress_mlp
    good = tmp_path / "val.npz"
    np.savez(good, x_val=x, y_val=y)
    cases = {
        "nan": (dict(x_val=np.where(np.arange(len(x))[:, None, None, None] == 5, np.nan, x), y_val=y),
                r"x_val row 5 holds NaN"),
        "shape": (dict(x_val=x[:, :, :4], y_val=y), r"x_val has shape .*expected \(rows, 1, 8, 8\)"),
        "keys": (dict(x=x, y=y), r"no array x_val, y_val \(it has: x, y\)"),
        "objects": (dict(x_val=np.array([{"a": 1}] * len(y), dtype=object), y_val=y), r"Python objects"),
        "labels": (dict(x_val=x, y_val=y + 20), r"int labels in \[0, 10\)"),
    }
    for label, (arrays, pattern) in cases.items():
        bad = tmp_path / f"{label}.npz"
        np.savez(bad, **arrays)
        assert main(["search", str(path), "--data", str(bad), "--pareto", "--dry-run"]) == 2, label
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(pattern, err), (label, err)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert main(["search", str(path), "--data", str(tmp_path / "junk.npz"), "--pareto"]) == 2
    assert "not a readable .npz" in capsys.readouterr().err
    plain = tmp_path / "plain.efx"
    ef.export(nn.Linear(4, 2), torch.zeros(2, 4), plain)
    np.savez(tmp_path / "lin.npz", x_val=np.zeros((20, 4), np.float32), y_val=np.zeros(20, np.int64))
    assert main(["search", str(plain), "--data", str(tmp_path / "lin.npz"), "--latency-ms", "1"]) == 2
    assert "no configs that compose per layer" in capsys.readouterr().err
    assert main(["search", str(path), "--data", str(good)]) == 2          # neither --pareto nor a budget
    assert load_npz(good, ("x_val", "y_val"))["x_val"].shape == x.shape


def test_a_per_layer_level_naming_no_weight_or_no_level_of_the_bundle_is_refused_in_one_line(
        dress_mlp) -> None:
    _, path, _ = dress_mlp
    with ef.Bundle.open(path) as b:
        manifest = json.loads(json.dumps(b.manifest))
    config = manifest["configs"][1]
    for layers, pattern in (({"9.weight": 1}, r"dress\.layers.*a weight of dress\.segments\.main"),
                            ({"1.weight": 7}, r"dress\.layers\['1\.weight'\]"),
                            ({"1.weight": "1"}, r"dress\.layers\['1\.weight'\]")):
        config["dress"]["layers"] = layers
        with pytest.raises(ef.BundleError, match=pattern) as e:
            check_manifest(path / "manifest.json", manifest)
        assert "\n" not in str(e.value)
    config["dress"]["layers"] = {"1.weight": 3, "3.weight": 0}
    check_manifest(path / "manifest.json", manifest)
    kind = ef.Config.from_json(config).kind
    assert (kind.level_of("1.weight"), kind.level_of("3.weight"), kind.level_of("5.weight")) == (3, 0, 1)
