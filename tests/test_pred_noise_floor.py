"""benchmarks/pred_noise_floor.py: the agreement of two saved predictor runs, on small synthetic runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
pred_noise_floor = pytest.importorskip("pred_noise_floor")


def _run(folder: Path, scale: float, outlier: float) -> Path:
    """A saved run: 10 configs of 16 rounds and one kernel, at 1 thread; every time times `scale`, config
    c0 also times `outlier`."""
    folder.mkdir()
    samples = []
    for i in range(10):
        p50 = (i + 1) * 0.1 * scale * (outlier if i == 0 else 1.0)
        samples.append({"label": f"c{i}", "family": "f", "p50_ms": p50, "round_p50_ms": [p50] * 16})
    (folder / "samples-t1.json").write_text(json.dumps({"samples": samples, "others_load": 0.0}))
    (folder / "kernels-t1.json").write_text(json.dumps({"conv|Conv|x": [0.05 * scale] * 16,
                                                        "__run_overhead__": [0.004] * 16}))
    return folder


def test_rescaled_agreement_takes_out_a_common_scale_only(tmp_path):
    a = _run(tmp_path / "a", 1.0, 1.0)
    b = _run(tmp_path / "b", 0.8, 1.5)      # 20 % faster overall; c0 50 % slower on top
    text = pred_noise_floor.report([a, b], 10.0, 5)
    row = next(line for line in text.splitlines() if "| configs |" in line)
    cells = [c.strip() for c in row.split("|")]
    assert cells[5] == "0.800"                      # the common scale
    assert cells[6] == "0%"                         # raw: every config 20 % off
    assert cells[7] == "**90%**"                    # rescaled: all but c0
    assert "c0 +50 %" in cells[10]


def test_a_folder_that_is_not_a_saved_run_is_one_line(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "samples-t1.json").write_text("{}")
    script = ROOT / "benchmarks" / "pred_noise_floor.py"
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0
    assert "is not a saved bench_predictor.py --kernels run" in r.stderr
