"""The `edgeflex` command line, run as a user would (a subprocess), on real trained bundles."""

import json
import subprocess
import sys

import numpy as np
import pytest

import edgeflex as ef


def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "edgeflex", *map(str, args)], capture_output=True, text=True,
                       check=False,
                       timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"edgeflex {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    r = cli("demo", "--out", out, "--runs", "20")
    return out, r.stdout, json.loads((out / "summary.json").read_text())


def test_demo_trains_exports_and_runs_both_models(demo):
    out, stdout, summary = demo
    fits, star = summary["models"]["fits"], summary["models"]["starnet-s050"]
    # FITS must beat the seasonal-naive forecast on held-out CO2; StarNet must learn the digits.
    assert fits["quality"]["value"] < fits["quality"]["baseline"]["value"]
    assert star["quality"]["value"] >= 0.9
    # The quality measured through the bundle on ONNX Runtime is the trained model's.
    assert fits["bundle_quality"] == pytest.approx(fits["quality"]["value"], rel=1e-4)
    assert star["bundle_quality"] == pytest.approx(star["quality"]["value"], abs=1 / 360)
    for name in ("fits", "starnet-s050"):
        assert name in stdout
        assert summary["models"][name]["export_error"]["max_rel_err"] <= 1e-4
        assert ef.Runtime(out / f"{name}.efx").configs[0].quality is not None


def test_info_and_run_roundtrip(demo, tmp_path):
    out, _, _ = demo
    bundle = out / "fits.efx"
    text = cli("info", bundle).stdout
    assert "fits" in text and "export" in text and "default" in text
    info = json.loads(cli("info", bundle, "--json").stdout)
    assert info["inputs"] == ["x [batch, 208, 1] float32"]
    x = np.random.default_rng(0).standard_normal((3, 208, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = cli("run", bundle, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert "shape [3, 260, 1]" in r.stdout
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ef.Runtime(bundle).run(x), rtol=0, atol=1e-6)


def test_run_bad_input_is_one_line_error(demo, tmp_path):
    out, _, _ = demo
    np.save(tmp_path / "x64.npy", np.zeros((1, 208, 1)))
    r = cli("run", out / "fits.efx", "--input", tmp_path / "x64.npy", check=False)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "float64" in r.stderr and "astype" in r.stderr
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    r = cli("run", out / "fits.efx", "--input", tmp_path / "obj.npy", check=False)
    assert r.returncode == 2 and "cannot read input" in r.stderr and r.stderr.count("\n") == 1


def test_profile_for_another_device_is_refused_where_it_cannot_run(demo, tmp_path):
    """A profile stored under a device's name must be measured on that device: an aarch64 board's from
    an x86-64 machine, or a GPU's without its engines, is refused in one line and nothing is stored."""
    import platform
    import shutil

    out, _, _ = demo
    path = tmp_path / "fits.efx"
    shutil.copytree(out / "fits.efx", path)
    if platform.machine() != "aarch64":
        r = cli("profile", path, "--device", "rpi5", check=False)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "rpi5 is aarch64" in r.stderr and "run `edgeflex profile` there" in r.stderr
    r = cli("profile", path, "--backend", "tvm", "--device", "nvidia-h100-sxm:gpu", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    r = cli("profile", path, "--device", "nope", check=False)
    assert r.returncode == 2 and "unknown device 'nope'" in r.stderr
    assert not list((path / "profiles").glob("*.json")) if (path / "profiles").exists() else True


def test_tampered_bundle_names_the_file(demo, tmp_path):
    import shutil
    out, _, _ = demo
    copy = tmp_path / "t.efx"
    shutil.copytree(out / "starnet-s050.efx", copy)
    graph = copy / "graphs" / "main.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    r = cli("info", copy, check=False)
    assert r.returncode == 2 and "graphs/main.onnx" in r.stderr and "sha256" in r.stderr


def test_export_untrained_starnet_and_unknown_model(tmp_path):
    r = cli("export", "--model", "starnet-s050", "--image-size", "32", "--out", tmp_path / "s.efx")
    assert "wrote" in r.stdout
    rt = ef.Runtime(tmp_path / "s.efx")
    assert rt.inputs[0].shape == (None, 3, 32, 32) and rt.bundle.manifest["model"]["variant"] == "s050"
    r = cli("export", "--model", "resnet50", "--out", tmp_path / "r.efx", check=False)
    assert r.returncode == 2 and "invalid choice" in r.stderr
    assert not (tmp_path / "r.efx").exists()


def test_profile_at_two_thread_counts_then_query(snnet_bundle, tmp_path):
    import shutil

    path = tmp_path / "sn.efx"
    shutil.copytree(snnet_bundle[1], path)
    r = cli("profile", path, "--threads", "2,1", "--no-memory", "--min-seconds", "0.02")
    assert "at 1 thread(s):" in r.stdout and "2, 1 threads" in r.stdout
    prof = json.loads((path / "profiles" / "host.json").read_text())
    assert set(prof["by_threads"]) == {"1", "2"} and prof["configs"] == prof["by_threads"]["2"]
    assert set(prof["stalls"]["by_threads"]) == {"1", "2"}          # stalls counted per thread count
    assert all(0 <= v["share"] <= 1 for v in prof["stalls"]["by_threads"].values())
    hits = json.loads(cli("query", path, "--latency-ms", "1e6", "--json").stdout)["configs"]
    values = [h["quality"]["value"] for h in hits]
    assert len(hits) == len(prof["configs"]) and values == sorted(values, reverse=True)
    bad = cli("profile", path, "--threads", "2,x", check=False)
    assert bad.returncode != 0 and "threads must be N or N,M" in bad.stderr


def test_a_profile_measured_while_the_machine_stalled_says_so_in_one_line(snnet_bundle, monkeypatch):
    """2 % of the 1-thread runs 25x the median (the core taken for a while, as a shared VM does): the
    profile counts them per thread count and `stall_warning` names that count. A profile without stalls, or
    from before edgeflex counted them, has no warning."""
    from edgeflex.runtime import profiles

    def stalling(calls, **kw):
        # made-up times, so that the machine running the test (a loaded CI box stalls for real) decides
        # nothing: 0.1-0.2 ms, and at 1 thread every 50th run 5 ms
        rng = np.random.default_rng(0)
        out = {}
        for threads, name in calls:
            got = list(0.1 + 0.1 * rng.random(400))
            if threads == 1:
                got[::50] = [5.0] * len(got[::50])
            out[(threads, name)] = got
        return out

    monkeypatch.setattr(profiles, "interleaved", stalling)
    rt = ef.Runtime(snnet_bundle[1], threads=(2, 1))
    prof = profiles.measure_profile(rt, memory=False, progress=False)
    st = prof["stalls"]["by_threads"]
    assert st["1"] == {"share": 0.02, "max_ms": 5.0} and st["2"] == {"share": 0.0, "max_ms": 0.0}
    msg = profiles.stall_warning(prof)
    assert msg.startswith("the machine stalled while profiling: at 1 thread(s) 2 % of runs took over 10x "
                          "their config's median (up to 5 ms)") and "\n" not in msg
    assert "at 2 thread(s)" not in msg and "profile again" in msg
    prof["stalls"]["by_threads"]["1"]["share"] = 0.0
    prof["stalls"]["steal_share"] = 0.0
    assert profiles.stall_warning(prof) is None
    del prof["stalls"]
    assert profiles.stall_warning(prof) is None


def test_run_takes_one_input_file_per_input_and_writes_one_file_per_output(tmp_path):
    import torch

    class TwoInTwoOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(5, 7), torch.nn.Linear(3, 7)

        def forward(self, x, y):
            return torch.tanh(self.a(x) + self.b(y)), self.a(x).softmax(-1)

    bundle = tmp_path / "two.efx"
    ef.export(TwoInTwoOut().eval(), (torch.randn(2, 5), torch.randn(2, 3)), bundle)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 5)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    r = cli("run", bundle, "--input", tmp_path / "a.npy", "--input", tmp_path / "b.npy",
            "--output", tmp_path / "y0.npy", "--output", tmp_path / "y1.npy")
    want = ef.Runtime(bundle).run(a, b)
    for i in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"y{i}.npy"), want[i], rtol=0, atol=1e-6)
        assert f"-> {tmp_path / f'y{i}.npy'}" in r.stdout
    for args, why in [(["--input", tmp_path / "a.npy"], "1 --input file(s) for 2 input(s)"),
                      (["--input", tmp_path / "a.npy", "--input", tmp_path / "b.npy", "--output",
                        tmp_path / "z.npy", "--output", tmp_path / "z.npy"], "names one file twice")]:
        r = cli("run", bundle, *args, check=False)
        assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "z.npy").exists()
