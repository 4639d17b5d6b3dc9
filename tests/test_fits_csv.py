"""FITS and elastic FITS on the user's own CSV (`ef.elastic.fits_csv`, `edgeflex train fits`): a synthetic
seasonal series written here with a date column, split 70/10/20 in time order, scaled by the training rows,
trained for a few epochs, exported and run through `Runtime` with the recorded test MSE; every bad CSV ends
in one line before any training.
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
from test_stitch import one_thread  # noqa: F401 - autouse: torch on one thread, as test_stitch

import edgeflex as ef
from edgeflex.cli import main
from edgeflex.models import ett, series
from edgeflex.models.fits import cut_freq_for

ROWS, L, H = 1200, 96, 24
COLUMNS = ("load", "temp", "price")


def write_csv(path, values: np.ndarray, header=("date", *COLUMNS), cells=None) -> None:
    """`values` [rows, 3] under a date column; `cells`: {(row, col): text} overrides (col counts the date)."""
    t0 = dt.datetime(2024, 1, 1)
    lines = [",".join(header)]
    for i, row in enumerate(values):
        out = [f"{t0 + dt.timedelta(hours=i):%Y-%m-%d %H:%M}", *(f"{v:.5f}" for v in row)]
        for (r, c), text in (cells or {}).items():
            if r == i:
                out[c] = text
        lines.append(",".join(out))
    path.write_text("\n".join(lines) + "\n")


def seasonal(rows: int = ROWS, seed: int = 0) -> np.ndarray:
    """A daily cycle (24 steps), a weekly one, a slow trend and noise; three columns of different scales."""
    rng = np.random.default_rng(seed)
    t = np.arange(rows)[:, None]
    phase = rng.uniform(0, 2 * np.pi, 3)
    return ((np.sin(2 * np.pi * t / 24 + phase) + 0.4 * np.sin(2 * np.pi * t / 168 + phase) + 0.001 * t
             + 0.1 * rng.standard_normal((rows, 3))) * [10.0, 1.0, 100.0] + [50.0, 0.0, 300.0])


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("dcsv") / "plant.csv"
    write_csv(path, seasonal())
    return path


def test_split_is_chronological_70_10_20_and_scaler_from_training_rows(csv_path):
    assert series.borders(1000, 96) == {"train": (0, 700), "val": (604, 800), "test": (704, 1000)}
    fit = ef.elastic.fits_csv(csv_path, lookback=L, horizon=H, epochs=1, progress=False)
    raw, names, _ = series.read_csv(csv_path)
    assert names == list(COLUMNS) and raw.shape == (ROWS, 3)          # the date column skipped
    meta = fit.metadata
    assert meta["data"]["split"] == {"train": [0, 840], "val": [744, 960], "test": [864, 1200]}
    np.testing.assert_allclose(meta["scaler"]["mean"], raw[:840].mean(0))
    np.testing.assert_allclose(meta["scaler"]["std"], raw[:840].std(0))
    assert len(fit.test) == 1200 - 864 - L - H + 1


def test_fits_on_csv_beats_the_naive_forecast_and_the_bundle_gives_its_mse(csv_path, tmp_path):
    fit = ef.elastic.fits_csv(csv_path, lookback=L, horizon=H, epochs=15, progress=False)
    q = fit.quality
    assert q["split"] == "test" and q["value"] < q["baseline"]["value"]     # learnt the cycles
    bundle = fit.export(tmp_path / "f.efx")
    assert bundle.family == "fits" and bundle.manifest["metadata"]["scaler"]["columns"] == list(COLUMNS)
    got = ett.evaluate(ef.Runtime(bundle.path, threads=1).run, fit.test)
    assert abs(got["mse"] - q["value"]) < 1e-5


def test_cli_trains_elastic_fits_every_level_runs_with_its_recorded_mse(csv_path, tmp_path, capsys):
    out = tmp_path / "e.efx"
    assert main(["train", "fits", "--csv", str(csv_path), "--columns", "temp,load", "--lookback", str(L),
                 "--horizon", str(H), "--elastic", "--epochs", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "trained on 1200 rows" in printed and "wrote" in printed
    m = json.loads((out / "manifest.json").read_text())
    assert m["family"] == "fits-elastic" and m["inputs"][0]["shape"] == [None, L, 2]
    cuts = [c["name"] for c in m["configs"]]
    assert len(cuts) >= 3 and all(c.startswith("cut-") for c in cuts)
    # the documented split, rebuilt from the CSV and the manifest's scaler, gives each level's recorded MSE
    raw, _, _ = series.read_csv(csv_path, ["temp", "load"])
    sc = m["metadata"]["scaler"]
    z = ((raw - np.array(sc["mean"])) / np.array(sc["std"])).astype(np.float32)
    a, b = m["metadata"]["data"]["split"]["test"]
    test = ett.Split(z[a:b], L, H)
    rt = ef.Runtime(out, threads=1)
    for c in rt.configs:
        rt.switch(c.name)
        assert abs(ett.evaluate(rt.run, test)["mse"] - c.quality["value"]) < 1e-5


def _bad_csv(tmp_path, case: str):
    values, header, cells, kw = seasonal(), ("date", *COLUMNS), {}, {}
    if case == "text":
        cells = {(7, 2): "n/a"}
    elif case == "nan":
        cells = {(9, 1): "nan"}
    elif case == "empty":
        cells = {(11, 3): ""}
    elif case == "short":
        values = values[:150]
    elif case == "unknown":
        kw = {"columns": ["load", "humidity"]}
    elif case == "constant":
        values[:, 1] = 3.0
    elif case == "date":
        header = ("when", *COLUMNS)
    elif case == "ragged":
        cells = {(4, 3): "1.0,2.0"}
    elif case == "named-date":
        kw = {"date_column": "stamp"}
    path = tmp_path / f"{case}.csv"
    write_csv(path, values, header, cells)
    return path, kw


BAD = [
    ("text", r"line 9, column 'temp': 'n/a' is not a number"),
    ("nan", r"1 rows with an empty, NaN or inf cell \(first: line 11, column 'load'\)"),
    ("empty", r"1 rows with an empty, NaN or inf cell \(first: line 13, column 'price'\)"),
    ("short", r"150 rows; look-back 96 \+ horizon 24 need at least 224"),
    ("unknown", r"unknown column\(s\) 'humidity'; its columns are date, load, temp, price"),
    ("constant", r"column\(s\) 'temp' are constant over the training rows"),
    ("date", r"line 2, column 'when': '2024-01-01 00:00' is not a number; name it with --date-column"),
    ("ragged", r"line 6: 5 cells, the header has 4"),
    ("named-date", r"no date column 'stamp'; its columns are date, load, temp, price"),
]


@pytest.mark.parametrize("case,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_csv_is_one_data_error_before_training(tmp_path, monkeypatch, case, pattern):
    monkeypatch.setattr(ett, "fit", lambda *a, **k: pytest.fail("trained on a bad CSV"))
    path, kw = _bad_csv(tmp_path, case)
    with pytest.raises(ef.DataError, match=pattern) as e:
        ef.elastic.fits_csv(path, lookback=L, horizon=H, progress=False, **kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["text", "short", "unknown"])
def test_cli_bad_csv_is_one_line(tmp_path, monkeypatch, capsys, case):
    monkeypatch.setattr(ett, "fit", lambda *a, **k: pytest.fail("trained on a bad CSV"))
    path, kw = _bad_csv(tmp_path, case)
    extra = ["--columns", ",".join(kw["columns"])] if kw else []
    assert main(["train", "fits", "--csv", str(path), "--lookback", str(L), "--horizon", str(H),
                 "--out", str(tmp_path / "x.efx"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeflex: error: ") and err.count("\n") == 1
    assert not (tmp_path / "x.efx").exists()


def test_the_minimum_rows_give_every_part_one_window():
    assert series.min_rows(96, 24) == 224      # the 10 % validation part holds one horizon
    parts = series.borders(series.min_rows(96, 24), 96)
    assert all(b - a >= 96 + 24 for a, b in parts.values())


def test_a_date_column_of_another_name_is_skipped_when_named(tmp_path):
    path = tmp_path / "when.csv"
    write_csv(path, seasonal(300), ("when", *COLUMNS))
    values, names, source = series.read_csv(path, date_column="when")
    assert names == list(COLUMNS) and values.shape == (300, 3) and source["date_column"] == "when"


def test_an_array_trains_like_its_csv(csv_path):
    raw, names, _ = series.read_csv(csv_path)
    from_csv = ef.elastic.fits_csv(csv_path, lookback=L, horizon=H, epochs=1, progress=False)
    from_array = ef.elastic.fits_series(raw, lookback=L, horizon=H, names=names, epochs=1, progress=False)
    assert from_array.quality["value"] == pytest.approx(from_csv.quality["value"], rel=1e-6)
    assert from_array.metadata["scaler"] == from_csv.metadata["scaler"]
    bad = raw.copy()
    bad[3, 1] = np.inf
    with pytest.raises(ef.DataError, match=r"series has 1 rows with NaN or inf \(first: row 3\)"):
        ef.elastic.fits_series(bad, lookback=L, horizon=H, progress=False)
    with pytest.raises(ef.DataError, match=r"expected \[time steps, columns\]"):
        ef.elastic.fits_series(raw[None], lookback=L, horizon=H, progress=False)


@pytest.mark.parametrize("kw", [{"lookback": 0}, {"horizon": 2.5}, {"period": 0}, {"cut_freq": -3},
                                {"epochs": 0}])
def test_bad_settings_are_one_usage_error_line(csv_path, kw):
    with pytest.raises(ef.UsageError, match=f"{next(iter(kw))} must be an int >= 1"):
        ef.elastic.fits_csv(csv_path, **{"lookback": L, "horizon": H, **kw}, progress=False)


def test_the_default_period_is_a_season_the_lookback_holds_not_the_trend(tmp_path):
    values = seasonal()
    values += np.arange(ROWS)[:, None] * np.array([0.5, 0.05, 5.0])     # a trend stronger than the seasons
    path = tmp_path / "trend.csv"
    write_csv(path, values)
    fit = ef.elastic.fits_csv(path, lookback=L, horizon=H, epochs=1, progress=False)
    assert fit.metadata["training"]["period"] == 24
    assert fit.model.cut_freq == cut_freq_for(L, 24, 6)
