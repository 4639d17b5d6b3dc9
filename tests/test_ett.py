"""ETT data handling, elastic FITS levels and their bundles (issue 6).

Uses a synthetic CSV in the ETT-small layout (value = row + 1000 * column after row 0, so every window shows
which rows it came from) so the suite does not need the shared data; one test checks the shared copy when
it is there. Training runs are one epoch: equality does not need a good model, the benchmark measures that.
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
import torch

import edgeflex as ef
from edgeflex.cli import main
from edgeflex.export.fits_elastic import export_fits_elastic
from edgeflex.kernels import spectral
from edgeflex.models import ett
from edgeflex.models.dlinear import DLinear
from edgeflex.models.fits import spectral_weights
from edgeflex.models.fits_elastic import ElasticFITS, evaluate_levels, train_elastic

ROWS = ett.TEST_END + 5                 # a few rows past the test border, as the real file has


def _write_csv(path, values: np.ndarray) -> None:
    t0 = dt.datetime(2016, 7, 1)
    lines = ["date," + ",".join(ett.COLUMNS)]
    lines += [f"{t0 + dt.timedelta(hours=i):%Y-%m-%d %H:%M:%S}," + ",".join(f"{v:.6f}" for v in row)
              for i, row in enumerate(values)]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def index_csv(tmp_path_factory):
    """value[t, c] = t + 1000 c: windows reveal their rows exactly."""
    path = tmp_path_factory.mktemp("ett") / "ETTh1.csv"
    _write_csv(path, np.arange(ROWS)[:, None] + 1000.0 * np.arange(7))
    return path


@pytest.fixture(scope="module")
def seasonal_csv(tmp_path_factory):
    """Daily and weekly cycles plus noise: something FITS can learn in one epoch."""
    rng = np.random.default_rng(0)
    t = np.arange(ROWS)[:, None]
    phase = rng.uniform(0, 2 * np.pi, 7)
    values = (np.sin(2 * np.pi * t / 24 + phase) + 0.5 * np.sin(2 * np.pi * t / 168 + 2 * phase)
              + 0.1 * rng.standard_normal((ROWS, 7)) + np.arange(7))
    path = tmp_path_factory.mktemp("ett-seasonal") / "ETTh1.csv"
    _write_csv(path, values)
    return path


def test_split_borders_are_the_literatures(index_csv):
    L, H = 360, 96
    assert ett.borders(L) == {"train": (0, 8640), "val": (8280, 11520), "test": (11160, 14400)}
    d = ett.load_splits("ETTh1", L, H, data=index_csv)

    def to_row(z: np.ndarray) -> np.ndarray:          # channel 0 holds the row number before scaling
        return np.rint(d.scaler.mean[0] + d.scaler.std[0] * z[..., 0]).astype(int)

    rows = {name: to_row(s.z) for name, s in (("train", d.train), ("val", d.val), ("test", d.test))}
    assert (rows["train"][0], rows["train"][-1]) == (0, 8639)
    assert (rows["val"][0], rows["val"][-1]) == (8640 - L, 11519)
    assert (rows["test"][0], rows["test"][-1]) == (11520 - L, 14399)      # rows past 14400 are never used
    assert (len(d.train), len(d.val), len(d.test)) == (8640 - L - H + 1, 2880 - H + 1, 2880 - H + 1)
    # The first validation / test target is the row after the previous split; the last ends at the border.
    for split, first_y, last_y in ((d.val, 8640, 11519), (d.test, 11520, 14399)):
        x, y = split.windows(np.array([0, len(split) - 1]))
        assert to_row(y)[0, 0] == first_y and to_row(x)[0, -1] == first_y - 1 and to_row(y)[1, -1] == last_y
        assert x.shape[1:] == (L, 7) and y.shape[1:] == (H, 7)


def test_scaler_is_fit_on_training_rows_only(index_csv, tmp_path):
    series, _ = ett.load_ett("ETTh1", index_csv)
    s = ett.Scaler.fit(series)
    np.testing.assert_allclose(s.mean, series[:8640].mean(axis=0))
    np.testing.assert_allclose(s.std, series[:8640].std(axis=0))
    # Changing every row after the training border changes nothing in the scaler.
    other = series.copy()
    other[8640:] = other[8640:] * 50 - 7
    _write_csv(tmp_path / "ETTh1.csv", other)
    d = ett.load_splits("ETTh1", 96, 24, data=tmp_path)
    np.testing.assert_allclose(d.scaler.mean, s.mean, rtol=1e-9)
    np.testing.assert_allclose(d.scaler.std, s.std, rtol=1e-9)
    z = d.scaler.transform(other)
    assert abs(z[:8640].mean()) < 1e-5 and abs(z[:8640].std() - 1) < 1e-5 and z[8640:].mean() > 10
    assert d.meta()["scaler"]["fit_rows"] == [0, 8640]


def test_missing_or_wrong_csv_is_one_clear_error(tmp_path):
    with pytest.raises(ef.UsageError, match="--data"):
        ett.resolve_csv("ETTh1", tmp_path / "nowhere")
    (tmp_path / "ETTh1.csv").write_text("date,a,b\n2016-07-01 00:00:00,1,2\n")
    with pytest.raises(ef.UsageError, match="not an ETT-small CSV"):
        ett.load_ett("ETTh1", tmp_path)


@pytest.mark.skipif(not (ett.DEFAULT_DIR / "ETTh1.csv").is_file(), reason="shared ETT data not present")
def test_shared_etth1_is_the_unmodified_file():
    series, source = ett.load_ett("ETTh1")
    assert series.shape == (17420, 7) and source["rows"] == 17420
    import hashlib
    assert hashlib.md5((ett.DEFAULT_DIR / "ETTh1.csv").read_bytes()).hexdigest() == \
        "8381763947c85f4be6ac456c508460d6"


def test_paper_parameter_count_and_dlinear():
    from edgeflex.models.fits import FITS, cut_freq_for
    s = ett.SETTINGS["ETTh1"]
    cut = cut_freq_for(s["seq_len"], s["period"], s["harmonic_order"])
    assert cut == 106 and ett.parameters(FITS(360, 96, 7, cut)) == 14338
    assert cut_freq_for(720, 24, 6) == 196
    m = DLinear(360, 96, 7)
    assert ett.parameters(m) == 2 * (360 * 96 + 96)
    # The moving average repeats the edge steps: a constant series has a constant trend, no seasonal part.
    x = torch.full((2, 360, 7), 3.0)
    np.testing.assert_allclose(m.decomposition(x).numpy(), 3.0, rtol=1e-6)


def _random_elastic(cuts=(30, 20, 11, 4), seq_len=72, pred_len=25, channels=3, seed=0) -> ElasticFITS:
    torch.manual_seed(seed)
    m = ElasticFITS(seq_len, pred_len, channels, cuts)
    layer = m.full.freq_upsampler
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, dtype=torch.cfloat) / cuts[0] ** 0.5)
        layer.bias.copy_(torch.randn(layer.bias.shape, dtype=torch.cfloat) * 0.1)
    return m.eval()


def test_nested_levels_are_top_left_blocks():
    m = _random_elastic()
    full = spectral_weights(m.full)
    x = torch.randn(4, m.seq_len, m.channels)
    outs = m.forward_levels(x)
    ups = [m.up_freq(k) for k in m.cut_freqs]
    assert ups == sorted(ups, reverse=True)
    for k, up, out in zip(m.cut_freqs, ups, outs):
        lvl = m.level(k)
        assert (lvl.cut_freq, lvl.up_freq) == (k, up)           # FITS's own rule gives the same block
        w = m.spectral_weights(k)
        np.testing.assert_array_equal(w.weight, full.weight[:up, :k])
        np.testing.assert_array_equal(w.bias, full.bias[:up])
        np.testing.assert_array_equal(spectral_weights(lvl).weight, w.weight)
        with torch.no_grad():
            ref = lvl(x)
            np.testing.assert_allclose(m.set_cut(k)(x).numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.detach().numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
        # The slice of a slice is the slice: any level can be derived from any larger one.
        small = m.cut_freqs[-1]
        np.testing.assert_array_equal(spectral.nested(w, small).weight, m.spectral_weights(small).weight)
    with pytest.raises(ValueError, match="not a level"):
        m.set_cut(7)


def test_elastic_bundle_stores_the_weight_once_and_equals_pytorch(tmp_path):
    m = _random_elastic()
    path = export_fits_elastic(m, torch.randn(2, m.seq_len, m.channels), tmp_path / "e.efx").path
    b = ef.Bundle.open(path)
    fe = b.manifest["fits_elastic"]
    assert [c.name for c in b.configs] == [f"cut-{k}" for k in m.cut_freqs]
    weights = b.manifest["files"]["weights.bin"]["bytes"]
    assert fe["storage"]["weight_bytes"] == 8 * m.level_parameters(m.cut_freqs[0])
    assert weights < fe["storage"]["separate_levels_bytes"]
    # The complex weight is stored once; per-level GEMM operands are derived at load, never stored. A level
    # whose measured form is lowrank also stores its (weight-free) DFT basis, so the tight bound holds only
    # when every level chose folded (the choice is by timing).
    shapes = [tuple(t["shape"]) for t in b.manifest["tensors"].values()]
    assert shapes.count(tuple(b.tensors()[fe["weight"]].shape)) == 1
    if all(c.kind.form == "folded" for c in b.configs):
        assert weights < fe["storage"]["weight_bytes"] + 2048
    assert all(b.manifest["files"][f"graphs/cut-{k}.onnx"]["bytes"] < 4096 for k in m.cut_freqs)
    flops = [c.flops for c in b.configs]
    assert flops[-1] <= flops[0]                        # folded costs the same at every cut (L x (L+H))
    if b.configs[-1].kind.form == "lowrank":
        assert flops[-1] < flops[0]                     # lowrank scales with the cut
    rt = ef.Runtime(path, threads=1)
    x = np.random.default_rng(1).standard_normal((5, m.seq_len, m.channels)).astype(np.float32)
    for c in rt.configs:
        rt.switch(c.name)
        with torch.no_grad():
            ref = m.level(c.kind.cut_freq)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(rt.run(x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_trained_elastic_bundle_gives_the_same_test_mse_per_level(seasonal_csv, tmp_path):
    model, d, record = train_elastic("ETTh1", 24, data=seasonal_csv, cut_freqs=(106, 40, 20),
                                     recipe=ett.Recipe(max_epochs=1), progress=False)
    levels = record["levels"]
    assert [lv["cut_freq"] for lv in levels] == [106, 40, 20] and levels[0]["parameters"] == 106 * 113 + 113
    quality = [{"metric": "mse", "value": lv["mse"], "direction": "lower"} for lv in levels]
    example = torch.from_numpy(d.test.windows(slice(0, 2))[0])
    path = export_fits_elastic(model, example, tmp_path / "e.efx", quality=quality).path
    rt = ef.Runtime(path, threads=1)
    for c, lv in zip(rt.configs, evaluate_levels(model, d.test)):
        rt.switch(c.name)
        got = ett.evaluate(rt.run, d.test)
        assert abs(got["mse"] - lv["mse"]) < 1e-5 and abs(got["mae"] - lv["mae"]) < 1e-5
        assert c.quality["value"] == pytest.approx(lv["mse"])
    assert levels[0]["mse"] < 1.0                    # one epoch already beats predicting the mean


def test_cli_exports_fits_etth1_with_scaler_in_manifest(seasonal_csv, tmp_path, capsys):
    out = tmp_path / "f.efx"
    assert main(["export", "--model", "fits-etth1", "--horizon", "24", "--epochs", "1", "--data",
                 str(seasonal_csv), "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["inputs"][0]["shape"] == [None, 360, 7] and m["outputs"][0]["shape"] == [None, 384, 7]
    assert m["metadata"]["scaler"]["fit_rows"] == [0, 8640] and len(m["metadata"]["scaler"]["mean"]) == 7
    assert m["model"]["parameters"] == 106 * 113 + 113
    d = ett.load_splits("ETTh1", 360, 24, data=seasonal_csv)
    got = ett.evaluate(ef.Runtime(out, threads=1).run, d.test)
    assert abs(got["mse"] - m["configs"][0]["quality"]["value"]) < 1e-5
    assert "wrote" in capsys.readouterr().out
