"""The device catalogue: every shipped file loads and every figure in it is sourced; broken files are refused
naming the file and the field; unknown names are refused; host detection is sane; power-mode scaling."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import edgeflex.devices as devices
from edgeflex.devices import catalog
from edgeflex.errors import DeviceError

EXPECTED = {"jetson-orin-nano-8gb", "jetson-agx-orin-64gb", "rpi5", "snapdragon-8-gen-2", "nvidia-h100-sxm"}


def _numbers_unsourced(node, path: str, sourced: bool) -> list[str]:
    """Paths of numeric leaves that neither sit in a {value, source} figure nor in a table naming a source."""
    if isinstance(node, dict):
        here = sourced or "source" in node
        return [p for k, v in node.items() for p in _numbers_unsourced(v, f"{path}.{k}", here)]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _numbers_unsourced(v, f"{path}[{i}]", sourced)]
    if isinstance(node, int | float) and not isinstance(node, bool):
        return [] if sourced else [path]
    return []


def test_catalogue_has_the_five_devices_and_loads():
    cat = devices.load_catalog()
    assert EXPECTED <= set(cat)
    for name, d in cat.items():
        assert d.name == name and d.obtained == "catalogue"
        assert d.cpu.peak_gflops["fp32"] > 0 and d.bandwidth_gbs > 0 and d.memory_gb > 0
        assert d.backends and all(b.unit in ("cpu", "gpu", "npu") for b in d.backends)
        json.dumps(d.to_json())


@pytest.mark.parametrize("path", sorted(catalog.CATALOG_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_every_figure_has_a_public_source(path: Path):
    raw = tomllib.loads(path.read_text())
    body = {k: v for k, v in raw.items() if k not in ("backends", "sources")}  # backends: config, not figures
    assert _numbers_unsourced(body, path.stem, False) == []
    d = devices.load_device_file(path)
    assert d.figures, "no figures read"
    for fpath, fig in d.figures.items():
        assert fig.says.strip(), fpath
        for sid in fig.source:
            assert sid in d.sources, (fpath, sid)
    for sid, s in d.sources.items():
        assert s.url.startswith("https://") and s.seen.strip(), sid


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_cpu_peak_matches_its_derivation(name: str):
    d = devices.get_device(name)
    if not d.cpu.clusters:
        pytest.skip("no clusters")
    derived = sum(c.cores * c.max_ghz * c.fp32_flops_per_cycle for c in d.cpu.clusters)
    assert d.cpu.peak_gflops["fp32"] == pytest.approx(derived, rel=0.01)
    if d.gpu is not None and "fp16" in d.gpu.peak_gflops and d.kind == "edge-soc":
        assert d.gpu.peak_gflops["int8"] == pytest.approx(2 * d.gpu.peak_gflops["fp16"])


def _good(tmp_path: Path) -> Path:
    src = (catalog.CATALOG_DIR / "rpi5.toml").read_text()
    (tmp_path / "rpi5.toml").write_text(src)
    return tmp_path / "rpi5.toml"


@pytest.mark.parametrize(
    "edit, field",
    [
        (
            lambda s: s.replace("bandwidth_gbs = { value = 17.07", "bandwith_gbs = { value = 17.07"),
            "memory.bandwidth_gbs",
        ),
        (lambda s: s.replace("\n[memory]\n", "\n[memory_]\n"), "memory"),
        (lambda s: s.replace("watts = 25\n", "watts = 25\nvolts = 5\n"), "power_modes[0].volts"),
        (
            lambda s: s.replace(
                'cores = { value = 4, source = "rpi5-brief", says = "2.4GHz',
                'cores = { value = "4", source = "rpi5-brief", says = "2.4GHz',
            ),
            "cpu.cores.value",
        ),
        (
            lambda s: s.replace(
                'max_ghz = { value = 2.4, source = "rpi5-brief", says = "2.4GHz" }\n\n[[',
                "max_ghz = 2.4\n\n[[",
            ),
            "cpu.max_ghz",
        ),
        (
            lambda s: s.replace(
                'size_gb = { value = 8, source = "rpi5-brief"', 'size_gb = { value = 8, source = "nope"'
            ),
            "memory.size_gb.source",
        ),
        (
            lambda s: s.replace('size_gb = { value = 8, source = "rpi5-brief", ', "size_gb = { value = 8, "),
            "memory.size_gb.source",
        ),
        (lambda s: s.replace('name = "rpi5"', 'name = "rpi6"'), "name"),
        (lambda s: s.replace('unit = "cpu"\ntarget', 'unit = "tpu"\ntarget'), "backends[2].unit"),
        (lambda s: s.replace("watts = 25\n", "watts = -25\n"), "power_modes[0].watts"),
        (
            lambda s: s.replace(
                "fp32_flops_per_cycle = { value = 16,", "fp32_flops_per_cycle = { value = 16.5,"
            ),
            "cpu.clusters[0].fp32_flops_per_cycle.value",
        ),
    ],
)
def test_bad_device_file_names_file_and_field(tmp_path: Path, edit, field: str):
    path = _good(tmp_path)
    path.write_text(edit(path.read_text()))
    with pytest.raises(DeviceError) as e:
        devices.load_catalog(tmp_path)
    msg = str(e.value)
    assert str(path) in msg and f"'{field}'" in msg, msg
    assert "\n" not in msg


def test_bad_toml_names_file(tmp_path: Path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "broken"\n[cpu\n')
    with pytest.raises(DeviceError, match=r"broken\.toml: not valid TOML"):
        devices.load_catalog(tmp_path)


def test_cluster_cores_must_add_up(tmp_path: Path):
    path = _good(tmp_path)
    path.write_text(
        path.read_text().replace(
            'cores = { value = 4, source = "rpi5-brief", says = "quad-core" }',
            'cores = { value = 3, source = "rpi5-brief", says = "quad-core" }',
        )
    )
    with pytest.raises(DeviceError, match=r"'cpu.clusters' count 3 cores"):
        devices.load_device_file(path)


def test_one_broken_file_does_not_hide_the_others(tmp_path: Path):
    _good(tmp_path)
    (tmp_path / "broken.toml").write_text("not toml [")
    assert devices.get_device("rpi5", dir=tmp_path).name == "rpi5"
    with pytest.raises(DeviceError, match="broken.toml"):
        devices.get_device("broken", dir=tmp_path)


def test_unknown_device_lists_known_names():
    with pytest.raises(DeviceError) as e:
        devices.get_device("jetson-nano-2gb")
    msg = str(e.value)
    assert "'jetson-nano-2gb'" in msg and "host" in msg and "rpi5" in msg and "\n" not in msg
    with pytest.raises(DeviceError, match="unknown device 'nope'"):
        devices.check_device("nope")
    assert devices.check_device("host") == "host"
    assert devices.check_device("rpi5") == "rpi5"
    assert devices.check_device("jetson-orin-nano-8gb:gpu") == "jetson-orin-nano-8gb:gpu"   # its GPU
    for bad, why in (("host:gpu", "unknown device 'host:gpu'"), ("rpi5:npu", "unknown unit 'npu'"),
                     ("nope:gpu", "unknown device 'nope:gpu'")):
        with pytest.raises(DeviceError, match=why) as e:
            devices.check_device(bad)
        assert "\n" not in str(e.value)


def test_host_detection_is_sane(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    h = devices.detect_host(measure=False)
    assert h.name == "host" and h.kind == "host" and h.obtained == "detected"
    assert h.cpu.cores == catalog.usable_cores() >= 1
    assert h.memory_gb > 0.1
    assert h.cpu.model == devices.host_info()["cpu"]
    assert all(f.source == ("detected",) for f in h.figures.values())
    calls = []

    def fake_peaks(**kw):
        calls.append(1)
        return {
            "core_gflops": 50.0,
            "copy_gbs": 20.0,
            "matmul_n": 384,
            "copy_mib": 64,
            "date": "now",
            "load_average": [0.5, 0.5, 0.5],
        }

    monkeypatch.setattr(catalog, "measure_host_peaks", fake_peaks)
    m = devices.detect_host(cache_dir=tmp_path)
    m2 = devices.detect_host(cache_dir=tmp_path)
    assert len(calls) == 1, "the second detection must use the cache"
    assert m.cpu.peak_gflops["fp32"] == m2.cpu.peak_gflops["fp32"] == 50.0 * h.cpu.cores
    assert m.bandwidth_gbs == 20.0
    assert m.figures["cpu.peak_gflops.fp32"].source == ("measured",)
    assert "measured" in m.obtained


def test_host_peaks_are_measured_for_real():
    m = catalog.measure_host_peaks(n=128, copy_mib=8, seconds=0.05)
    assert m["core_gflops"] > 0.1 and m["copy_gbs"] > 0.1


def test_power_mode_scales_peaks():
    agx = devices.get_device("jetson-agx-orin-64gb")
    low = agx.in_mode("15W")
    assert low.mode == "15W" and low.cpu.cores == 4
    assert low.cpu.peak_gflops["fp32"] == pytest.approx(
        agx.cpu.peak_gflops["fp32"] * 4 / 12 * 1113.6 / 2201.6
    )
    assert low.gpu.peak_gflops["fp16"] == pytest.approx(agx.gpu.peak_gflops["fp16"] * 420.75 / 1300)
    assert low.bandwidth_gbs == pytest.approx(204.8 * 2133 / 3199)
    assert low.figures["cpu.peak_gflops.fp32"].derived
    with pytest.raises(DeviceError, match="no power mode 'MAXQ'"):
        agx.in_mode("MAXQ")


def test_units_and_gpu_memory():
    h100 = devices.get_device("nvidia-h100-sxm")
    assert h100.memory_bandwidth_gbs("gpu") == 3350 and h100.memory_bandwidth_gbs("cpu") == 614.4
    assert h100.peak_gflops("gpu", "fp16") == 989500.0
    with pytest.raises(DeviceError, match="no described 'gpu' unit"):
        devices.get_device("rpi5").peak_gflops("gpu")
    with pytest.raises(DeviceError, match="no int8 peak"):
        h100.peak_gflops("cpu", "int8")


def test_list_rows_for_the_cli():
    rows = devices.list_rows(measure=False)
    assert [r["device"] for r in rows][0] == "host"
    assert EXPECTED <= {r["device"] for r in rows}
    assert all(tuple(r) == catalog.ROW_COLUMNS for r in rows)
    text = devices.render_rows(rows)
    assert "jetson-orin-nano-8gb" in text and "MAXN_SUPER" in text


def test_tvm_targets_are_dicts_with_the_right_host_cpu():
    nano = devices.get_device("jetson-orin-nano-8gb")
    tvm = {b.unit: b.target for b in nano.backends if b.engine == "tvm"}
    assert tvm["cpu"] == {
        "kind": "llvm",
        "mtriple": "aarch64-linux-gnu",
        "mcpu": "cortex-a78ae",
        "num-cores": 6,
    }
    assert tvm["gpu"]["arch"] == "sm_87" and tvm["gpu"]["host"]["mcpu"] == "cortex-a78ae"


def test_import_needs_no_torch_or_onnx():
    code = (
        "import sys, edgeflex.devices, edgeflex.devices.predictor; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'onnxruntime')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_catalogue_numbers_are_finite():
    for d in devices.load_catalog().values():
        for fig in d.figures.values():
            assert math.isfinite(fig.value)
