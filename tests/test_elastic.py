"""Elastic bundles end to end: DRESS levels and SN-Net stitches exported once, switched at run time.

Models are untrained (equality does not need training; the trained quality is the benchmarks' job)."""

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import edgeflex as ef
from edgeflex.export.elastic import export_dress
from edgeflex.kernels import rowsparse
from edgeflex.models.dress import DressModel, build_backbone


@pytest.fixture(scope="module")
def dress(tmp_path_factory):
    torch.manual_seed(0)
    model = DressModel(build_backbone("mlp")).eval()
    path = tmp_path_factory.mktemp("dress") / "mlp.efx"
    export_dress(model, torch.randn(2, 1, 8, 8), path)
    return model, path


@pytest.fixture(scope="module")
def snnet(snnet_bundle):
    return snnet_bundle


def _x(shape, n=3, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *shape[1:])).astype(np.float32)


def test_dress_every_level_equals_pytorch(dress):
    model, path = dress
    rt = ef.Runtime(path)
    assert [c.name for c in rt.configs] == ["density-100", "density-50", "density-25", "density-10"]
    x = _x((1, 1, 8, 8))
    for level, c in enumerate(rt.configs):
        rt.switch(c.name)
        assert rt.config == c.name
        with torch.no_grad():
            ref = model.set_level(level)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(rt.run(x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    flops = [c.flops for c in rt.configs]
    assert flops == sorted(flops, reverse=True) and flops[-1] < flops[0]


def test_dress_stored_codes_are_nested_and_row_balanced(dress):
    model, path = dress
    b = ef.Bundle.open(path)
    tensors = b.tensors()
    for init, d in b.manifest["dress"]["segments"]["main"].items():
        w = tensors[d["weight"]]
        codes = rowsparse.unpack_codes(tensors[d["codes"]], w.shape)
        np.testing.assert_array_equal(codes, model.codes[init].numpy())
        masks = [codes >= s for s in range(4)]
        for dense, sparse in zip(masks, masks[1:]):
            assert not (sparse & ~dense).any()               # nested: sparser subset of denser
        counts = rowsparse.row_counts(codes, 4)               # raises if rows disagree
        assert list(counts) == sorted(counts, reverse=True)


def test_dress_bundle_stores_weights_once(dress):
    _, path = dress
    b = ef.Bundle.open(path)
    total = sum(f["bytes"] for f in b.manifest["files"].values())
    densest = b.configs[0].param_bytes
    assert total <= 1.15 * densest, f"bundle {total} B is {total / densest:.3f}x the densest level's weights"


def test_snnet_every_config_chained_and_fused_equals_pytorch(snnet):
    model, path = snnet
    chained, fused = ef.Runtime(path, fused=False), ef.Runtime(path, fused=True)
    assert not chained.fused and len(chained.engines("s050")) > 1
    assert fused.fused and all(len(fused.engines(c.name)) == 1 for c in fused.configs)
    names = [c.name for c in chained.configs]
    assert len(names) >= 4 and set(names) >= {"s050", "s100"}
    x = _x((1, 3, 32, 32))
    for c in chained.configs:
        model.set_config(c.name)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        for rt in (chained, fused):
            rt.switch(c.name)
            np.testing.assert_allclose(rt.run(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    flops = [c.flops for c in chained.configs]
    assert flops == sorted(flops)


def test_snnet_auto_fuses_small_models_and_chains_when_copies_exceed_the_limit(snnet, monkeypatch):
    from edgeflex.runtime import runtime as runtime_mod

    _, path = snnet
    small = ef.Runtime(path)                                   # default "auto": weights are a few MB
    assert small.fused and "<=" in small.fused_reason
    assert all(len(small.engines(c.name)) == 1 for c in small.configs)
    monkeypatch.setattr(runtime_mod, "AUTO_FUSE_MB", 0.5)
    big = ef.Runtime(path)
    assert not big.fused and "chained" in big.fused_reason
    assert len(big.engines("s100")) > 1
    x = _x((1, 3, 32, 32))
    for c in small.configs:
        small.switch(c.name)
        big.switch(c.name)
        np.testing.assert_allclose(small.run(x), big.run(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ef.UsageError, match="fused=.yes.: expected one of True, False, .auto."):
        ef.Runtime(path, fused="yes")


def test_snnet_segments_are_shared_not_copied(snnet):
    _, path = snnet
    b = ef.Bundle.open(path)
    uses: dict[str, int] = {}
    for c in b.configs:
        for seg in c.segments:
            uses[seg] = uses.get(seg, 0) + 1
    assert max(uses.values()) >= 2                             # some segment serves several configs
    weights = b.manifest["files"]["weights.bin"]["bytes"]
    params = sum(p.numel() * 4 for p in snnet[0].parameters())
    assert weights <= 1.05 * params                             # every weight stored once (+ alignment)


def test_switch_under_concurrent_runs_never_mixes_configs(snnet):
    model, path = snnet
    rt = ef.Runtime(path, threads=1)
    x = _x((1, 3, 32, 32), n=1)
    expected = {}
    for c in rt.configs:
        model.set_config(c.name)
        with torch.no_grad():
            expected[c.name] = model(torch.from_numpy(x)).numpy()
    names = list(expected)
    errors, stop = [], threading.Event()

    def runner():
        while not stop.is_set():
            name, y = rt.run_config(x)
            if not np.allclose(y, expected[name], rtol=1e-4, atol=1e-4 * np.abs(expected[name]).max()):
                errors.append(name)

    threads = [threading.Thread(target=runner) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(400):
        rt.switch(names[i % len(names)])
    stop.set()
    for t in threads:
        t.join()
    assert not errors, f"runs mixed configs: {errors[:5]}"


def test_unknown_config_is_a_bundle_error(dress):
    _, path = dress
    rt = ef.Runtime(path)
    with pytest.raises(ef.BundleError, match="density-100"):
        rt.switch("density-42")
    with pytest.raises(ef.BundleError, match="no config"):
        ef.Runtime(path, config="nope")


@pytest.mark.parametrize("victim", ["weights.bin", "segment"])
def test_tampered_shared_segment_is_refused(snnet, tmp_path, victim):
    _, path = snnet
    copy = tmp_path / "t.efx"
    shutil.copytree(path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    if victim == "weights.bin":
        rel = "weights.bin"
    else:   # a segment that several configs share
        counts: dict[str, int] = {}
        for c in manifest["configs"]:
            for seg in c["segments"]:
                counts[seg] = counts.get(seg, 0) + 1
        rel = manifest["segments"][max(counts, key=counts.get)]["graph"]
    f = copy / rel
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ef.BundleError, match=rel.replace(".", r"\.")):
        ef.Runtime(copy)


def test_cli_info_shows_config_table_and_run_config(dress, tmp_path):
    import subprocess
    import sys
    _, path = dress
    r = subprocess.run([sys.executable, "-m", "edgeflex", "info", str(path)], capture_output=True, text=True,
                       check=True)
    assert "density-25" in r.stdout and "DRESS" in r.stdout
    x = _x((1, 1, 8, 8))
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run([sys.executable, "-m", "edgeflex", "run", str(path),
                        "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"),
                        "--config", "density-10"], capture_output=True, text=True, check=True)
    rt = ef.Runtime(path, config="density-10")
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), rt.run(x), atol=1e-6)
    assert Path(tmp_path / "y.npy").exists()


def test_dress_sparse_kernel_serves_every_level_and_choice_is_measured(dress):
    model, path = dress
    rt = ef.Runtime(path, dress_kernel="sparse")
    x = _x((1, 1, 8, 8), seed=5)
    for level, c in enumerate(rt.configs):
        rt.switch(c.name)
        with torch.no_grad():
            ref = model.set_level(level)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(rt.run(x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
        measured = c.kind.measured_ms_batch1
        assert set(measured) == {"dense", "sparse"}
        assert c.kind.kernel == min(measured, key=measured.get)
    # one sparse graph, the level a run-time input: a single engine serves all four levels
    engines = {id(rt.engines(c.name)[0]) for c in rt.configs}
    assert len(engines) == 1
    with pytest.raises(ef.UsageError, match="dress_kernel='fast': expected one of 'dense', 'sparse'"):
        ef.Runtime(path, dress_kernel="fast")
