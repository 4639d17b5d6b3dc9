"""Precision as a config (issue 21): `ef.quantize` adds int8 / fp16 variants of every config beside the fp32
ones; each runs on every backend that runs it natively and matches the fp32 model within a stated
tolerance; a precision a device or backend would emulate is refused in one line; a budget may choose one.

Tolerances (relative to the largest |output| of the fp32 model, on fresh inputs): int8 QDQ 0.15, fp16 0.02.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import edgeflex as ef
from edgeflex.devices.precision import check_precision, host_precisions, u8s8_saturates
from edgeflex.errors import DataError, DeviceError, ExportError, UsageError
from edgeflex.export.quantize import METHODS, quantize
from edgeflex.runtime.backends.onnxruntime import OnnxRuntimeBackend

sys.path.insert(0, str(Path(__file__).parent))
from authors_starnet import StarNet as AuthorsStarNet  # noqa: E402 - the authors' plain PyTorch model
from conftest import dress_mlp_int8  # noqa: E402

INT8_TOL, FP16_TOL = 0.15, 0.02


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _images(n: int = 40, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digits-like images (sklearn digits upscaled) and their labels: real pixels to calibrate on."""
    from edgeflex.models.digits import load_digits_images

    x, y, _, _ = load_digits_images(size, seed=seed)
    return np.ascontiguousarray(x[:n]), y[:n].astype(np.int64)


def _probe() -> np.ndarray:
    """Three digits images the variants were not calibrated on (int8 ranges are calibrated on the data's
    distribution: random normal probes would be clipped)."""
    x, _ = _images(60)
    return x[50:53]


def _fp16_device() -> str:
    """A device with fp16 arithmetic to quantize for: this host where its CPU has it (avx512_fp16, asimdhp),
    else the Raspberry Pi 5 (quantize refuses a precision its device lacks; the variants are measured on this
    host either way). An AMD EPYC CI machine has no fp16."""
    return "host" if "fp16" in host_precisions() else "rpi5"


def _export_quantized(model: torch.nn.Module, tmp: Path, precisions=("int8", "fp16")) -> Path:
    x, y = _images()
    path = tmp / "m.efx"
    ef.export(model, torch.from_numpy(x[:2]), path)
    quantize(path, {"x": x, "y": y}, precisions=precisions, progress=False, max_drop=100.0,
             device=_fp16_device() if "fp16" in precisions else "host")
    return path


def _torch(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def starnet_q(tmp_path_factory):
    from edgeflex.models.starnet import starnet

    torch.manual_seed(0)
    model = starnet("s050", num_classes=10).eval()
    return model, _export_quantized(model, tmp_path_factory.mktemp("q"))


def test_variants_sit_beside_fp32_with_their_records_and_weights_once_per_precision(starnet_q) -> None:
    _, path = starnet_q
    with ef.Bundle.open(path) as b:
        by = {c.name: c for c in b.configs}
        names = ("default", "default@int8", "default@fp16")
        assert [by[n].precision for n in names] == ["fp32", "int8", "fp16"]
        rec = by["default@int8"].quantization
        assert rec["base"] == "default" and rec["method"] in METHODS
        assert set(rec["vs_fp32"]["methods_tried"]) == set(METHODS)
        assert rec["vs_fp32"]["held_out_samples"] == 10 and rec["vs_fp32"]["calibration_samples"] == 30
        assert rec["vs_fp32"]["measured_against"] == "labels"
        assert rec["weight_bits"] == (7 if u8s8_saturates() else 8)      # what this CPU's kernels take
        files = b.manifest["files"]
        assert "weights/int8.bin" in files and "weights/fp16.bin" in files
        # content-addressed: each id names its bytes, and the int8 file holds int8 weights at 1/4 of fp32
        for tid, t in b.tensor_index.items():
            if t["file"] == "weights/int8.bin":
                assert tid.startswith("int8-")
        int8 = [t for t in b.tensor_index.values() if t["file"] == "weights/int8.bin" and t["dtype"] == "|i1"]
        assert int8, "no int8 weight tensors stored"
        assert files["weights/int8.bin"]["bytes"] < files["weights/fp16.bin"]["bytes"]
        assert by["default@int8"].param_bytes < by["default@fp16"].param_bytes < 4 * by["default"].flops


def test_edgeflex_starnet_int8_on_onnxruntime_matches_pytorch(starnet_q) -> None:
    model, path = starnet_q
    x = _probe()
    rt = ef.Runtime(path, threads=1, only=["default", "default@int8"])
    rt.switch("default@int8")
    assert _rel(rt.run(x), _torch(model, x)) < INT8_TOL
    rt.switch("default")
    assert _rel(rt.run(x), _torch(model, x)) < 1e-4


def test_fp16_runs_on_tvm_and_is_refused_where_onnxruntime_would_emulate_it(starnet_q, tmp_path) -> None:
    from edgeflex.compile.tvm import compile_bundle

    model, shared = starnet_q
    path = tmp_path / "m.efx"
    shutil.copytree(shared, path)
    x = _probe()
    why = OnnxRuntimeBackend().precision_refusal("fp16")
    if why is None:                              # a CPU with fp16 kernels in ORT (aarch64): it runs
        rt = ef.Runtime(path, threads=1, config="default@fp16")
        assert _rel(rt.run(x), _torch(model, x)) < FP16_TOL
    else:
        with pytest.raises(DeviceError, match="emulation|no fp16 arithmetic"):   # ORT, or the CPU itself
            ef.Runtime(path, threads=1, config="default@fp16")
        rt = ef.Runtime(path, threads=1)        # loads the rest, and says what it left out
        assert "default@fp16" in rt.unavailable and "default@fp16" in rt.info()["unavailable"]
        with pytest.raises(DeviceError, match="cannot run here"):
            rt.switch("default@fp16")
    if "fp16" not in host_precisions():
        pytest.skip("this CPU has no fp16 arithmetic (avx512_fp16 / asimdhp): TVM fp16 would be emulated")
    compile_bundle(path, "host", configs=["default@fp16"], batch1=False)
    rt = ef.Runtime(path, backend="tvm", threads=1, only=["default@fp16"])
    assert _rel(rt.run(x), _torch(model, x)) < FP16_TOL


def test_the_authors_starnet_int8_and_fp16_match_their_pytorch(tmp_path) -> None:
    torch.manual_seed(1)
    model = AuthorsStarNet(16, [1, 1, 2, 1], 3, num_classes=10).eval()
    path = _export_quantized(model, tmp_path)
    x = _probe()
    rt = ef.Runtime(path, threads=1)
    rt.switch("default@int8")
    assert _rel(rt.run(x), _torch(model, x)) < INT8_TOL
    with ef.Bundle.open(path) as b:
        rec = b.config("default@fp16").quantization
    assert rec["vs_fp32"]["max_rel_err"] < FP16_TOL    # measured on the held-out images at quantize


def test_every_snnet_config_gets_an_int8_variant_and_shared_weights_are_stored_once(snnet_bundle, tmp_path):
    model, shared = snnet_bundle
    path = tmp_path / "sn.efx"
    shutil.copytree(shared, path)
    x, y = _images(32)
    quantize(path, {"x": x, "y": y}, precisions=["int8"], methods=["minmax"], progress=False, max_drop=100.0)
    with ef.Bundle.open(path) as b:
        fp32 = [c.name for c in b.configs if c.precision == "fp32"]
        assert sorted(f"{n}@int8" for n in fp32) == sorted(c.name for c in b.configs if c.precision == "int8")
        refs = [tid for c in b.configs if c.precision == "int8" for s in c.segments
                for tid in b.segments[s].tensors.values()]
        assert len(set(refs)) < len(refs), "anchors' int8 weights should be shared between configs"
        names = fp32
    rt = ef.Runtime(path, threads=1)
    probe = _probe()
    for name in names[:: max(1, len(names) // 3)]:
        model.set_config(name)
        rt.switch(f"{name}@int8")
        assert _rel(rt.run(probe), _torch(model, probe)) < INT8_TOL, name


def test_dress_levels_get_int8_variants_from_their_masked_weights(tmp_path) -> None:
    model, path, x = dress_mlp_int8(tmp_path)
    rt = ef.Runtime(path, threads=1)
    levels = [c for c in rt.configs if c.precision == "fp32"]
    assert len(levels) > 1 and all(f"{c.name}@int8" in {d.name for d in rt.configs} for c in levels)
    probe = x[:4]
    for level, c in enumerate(levels):
        model.set_level(level)
        rt.switch(f"{c.name}@int8")
        assert _rel(rt.run(probe), _torch(model, probe)) < INT8_TOL, c.name


def test_fits_int8_and_fp16_are_measured_and_gated_at_two_percent_mse(copy, fits_model) -> None:
    """FITS (spectral path lowered to GEMMs, RevIN's LayerNormalization statistics) on noisy seasonal
    windows: each variant's forecast MSE against the targets is measured on the held-out quarter; one within
    2 % of fp32's is added and runs within tolerance of the PyTorch model, one over it is refused."""
    from conftest import FITS_SHAPE

    seq_len, pred_len, channels, _ = FITS_SHAPE
    rng = np.random.default_rng(3)
    t = np.arange(seq_len + pred_len)[None, :, None] + rng.integers(0, 50, (64, 1, 1))
    series = np.sin(2 * np.pi * t / 12.0) + 0.1 * rng.standard_normal((64, seq_len + pred_len, channels))
    data = {"x": series[:, :seq_len].astype(np.float32), "y": series[:, seq_len:].astype(np.float32)}
    report = quantize(copy, data, precisions=["int8", "fp16"], progress=False, device=_fp16_device())
    assert [v.precision for v in report.variants] == ["int8", "fp16"]
    for v in report.variants:
        assert v.metric == "mse" and v.drop is not None, v
        assert v.added == (v.drop <= 0.02), v
        if not v.added:
            assert "mse drops by" in v.why and "> the 2.00 % allowed" in v.why
    rt = ef.Runtime(copy, threads=1)
    x = data["x"][:4]
    for v in report.variants:
        if v.added and v.name in rt.loaded:
            rt.switch(v.name)
            assert _rel(rt.run(x), _torch(fits_model, x)) < (INT8_TOL if v.precision == "int8" else FP16_TOL)


def test_a_drop_over_the_threshold_is_refused_with_the_numbers(copy, fits_model) -> None:
    """Targets equal to the fp32 model's own forecasts: fp32's MSE is 0, so any int8 rounding is an
    unbounded relative rise, over any threshold."""
    from conftest import FITS_SHAPE

    seq_len, _, channels, _ = FITS_SHAPE
    x = np.random.default_rng(4).standard_normal((32, seq_len, channels)).astype(np.float32)
    y = _torch(fits_model, x)
    before = (copy / "manifest.json").read_bytes()
    with pytest.raises(ExportError, match=r"default@int8: mse drops by .* % > the 50\.00 % allowed "
                                          r"\(fp32 .*, int8 .* on 8 held-out samples against labels"):
        quantize(copy, {"x": x, "y": y}, precisions=["int8"], methods=["minmax"], max_drop=50.0,
                 progress=False)
    assert (copy / "manifest.json").read_bytes() == before         # nothing written


def test_a_precision_the_device_lacks_is_refused_in_one_line(starnet_q) -> None:
    _, path = starnet_q
    with pytest.raises(DeviceError, match="device 'rpi5' has no bf16 arithmetic"):
        check_precision("rpi5", "bf16")
    with pytest.raises(DeviceError, match="has no bf16 arithmetic"):
        quantize(path, {"x": _images()[0]}, precisions=["bf16"], device="rpi5", progress=False)
    assert "int8" not in host_precisions(flags={"sse4_2"}, arch="x86_64")
    assert host_precisions(flags={"avx512_vnni", "avx512_bf16"}, arch="x86_64") == {
        "fp32": "baseline", "int8": "avx512_vnni", "bf16": "avx512_bf16"}
    assert host_precisions(flags={"asimddp", "asimdhp"}, arch="aarch64").keys() == {"fp32", "int8", "fp16"}
    # int8 weights to 7 bits only where ORT's u8s8 kernels saturate: x86 without VNNI / AMX
    assert u8s8_saturates(flags={"avx2", "avx512f"}, arch="x86_64")
    assert not u8s8_saturates(flags={"avx2", "avx512_vnni"}, arch="x86_64")
    assert not u8s8_saturates(flags={"avx2", "avx_vnni"}, arch="x86_64")
    assert not u8s8_saturates(flags={"asimd"}, arch="aarch64")


def test_an_int8_variant_of_8_bit_weights_is_not_loaded_where_the_cpu_saturates_them(starnet_q, tmp_path,
                                                                                  monkeypatch) -> None:
    """A variant quantized on a CPU with VNNI (8-bit weights) and carried to an x86 CPU without it would
    run with ORT's u8s8 products saturating, its outputs off by more than its record says: left out with the
    reason (DeviceError in one line when asked for by name). 7-bit weights load there; 8-bit ones load where
    nothing saturates; a bundle without the record counts as 8-bit."""
    import json

    from edgeflex.devices import precision
    from edgeflex.runtime.bundle import MANIFEST
    from edgeflex.runtime.schema import seal_manifest

    _, src = starnet_q
    path = tmp_path / "m.efx"
    shutil.copytree(src, path)

    def set_bits(bits: int | None) -> None:
        m = json.loads((path / MANIFEST).read_text())
        for c in m["configs"]:
            if c.get("precision") == "int8":
                c["quantization"].pop("weight_bits", None)
                if bits is not None:
                    c["quantization"]["weight_bits"] = bits
        (path / MANIFEST).write_text(json.dumps(seal_manifest(m)))

    monkeypatch.setattr(precision, "u8s8_saturates", lambda flags=None, arch=None: True)
    for bits in (8, None):
        set_bits(bits)
        rt = ef.Runtime(path)
        assert "default@int8" not in rt.loaded and "default" in rt.loaded
        assert "saturates" in rt.unavailable["default@int8"] and "quantize it again here" in \
            rt.unavailable["default@int8"]
        with pytest.raises(DeviceError, match=r"config 'default@int8' \(int8\) cannot run here: its int8 "
                                              r"weights use 8 bits") as e:
            ef.Runtime(path, config="default@int8")
        assert "\n" not in str(e.value)
    set_bits(7)
    assert "default@int8" in ef.Runtime(path).loaded
    set_bits(8)
    monkeypatch.setattr(precision, "u8s8_saturates", lambda flags=None, arch=None: False)
    assert "default@int8" in ef.Runtime(path).loaded
    set_bits(9)
    with pytest.raises(ef.BundleError, match="weight_bits"):
        ef.Bundle.open(path)


def test_bad_calibration_data_and_arguments_are_one_line_errors(starnet_q, tmp_path) -> None:
    _, path = starnet_q
    with pytest.raises(DataError, match="has no array 'x'"):
        quantize(path, {"images": np.zeros((8, 3, 32, 32), np.float32)}, progress=False)
    with pytest.raises(DataError, match=r"expected x \[batch, 3, 32, 32\] float32"):
        quantize(path, {"x": np.zeros((8, 3, 16, 16), np.float32)}, progress=False)
    with pytest.raises(DataError, match="at least 8"):
        quantize(path, {"x": np.zeros((2, 3, 32, 32), np.float32)}, progress=False)
    with pytest.raises(DataError, match="not a file"):
        quantize(path, tmp_path / "none.npz", progress=False)
    with pytest.raises(UsageError, match="unknown precision 'int4'"):
        quantize(path, {"x": _images()[0]}, precisions=["int4"], progress=False)
    with pytest.raises(UsageError, match="has int8 configs already"):
        quantize(path, {"x": _images()[0]}, precisions=["int8"], progress=False)


def test_a_budget_may_be_met_by_int8_at_its_measured_quality_cost(starnet_q, tmp_path) -> None:
    """Given a profile in which the int8 variant is faster (written here: the policy's choice is what is
    tested, not the timing), a tight budget runs int8 and a loose one the better-quality fp32 config."""
    from edgeflex.runtime.policy import Budget
    from edgeflex.runtime.profiles import measure_profile, save_profile

    _, shared = starnet_q
    path = tmp_path / "m.efx"
    shutil.copytree(shared, path)
    rt = ef.Runtime(path, threads=1)
    prof = measure_profile(rt, warmup=1, min_runs=2, min_seconds=0.01, memory=False, progress=False, rounds=1)
    for name, ms in (("default", 10.0), ("default@int8", 4.0)):
        prof["configs"][name].update(p50_ms=ms, p90_ms=ms * 1.1, p99_ms=ms * 1.2)
    prof.pop("by_threads")
    save_profile(path, prof, merge=False)
    rt = ef.Runtime(path, threads=1)
    with ef.Bundle.open(path) as b:
        q32, q8 = b.config("default").quality, b.config("default@int8").quality
    assert q32 is None or q8["value"] <= q32["value"]
    assert rt.set_budget(Budget(latency_ms=8.0), adapt=False) == "default@int8"
    # room for both: the better quality; where int8 measured no loss, the faster at equal quality
    loose = "default@int8" if q32 is None or q8["value"] >= q32["value"] else "default"
    assert rt.set_budget(Budget(latency_ms=20.0), adapt=False) == loose
    assert [r["name"] for r in rt.query(Budget(latency_ms=8.0))] == ["default@int8"]


def test_cli_quantize_prints_a_row_per_variant(tmp_path, capsys) -> None:
    from edgeflex.cli import main
    from edgeflex.models.starnet import starnet

    torch.manual_seed(0)
    path = tmp_path / "m.efx"
    x, y = _images()
    ef.export(starnet("s050", num_classes=10).eval(), torch.from_numpy(x[:2]), path)
    np.savez(tmp_path / "cal.npz", x=x, y=y)
    rc = main(["quantize", str(path), "--calibration", str(tmp_path / "cal.npz"), "--precision", "int8",
               "--methods", "minmax", "--max-drop", "100", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "default@int8" in out and "added" in out
    assert main(["info", str(path)]) == 0                    # the config table names each config's precision
    table = capsys.readouterr().out
    row = next(ln for ln in table.splitlines() if ln.startswith("default@int8"))
    assert "precision" in table and row.split()[1] == "int8"
    missing = str(tmp_path / "nope.npz")
    assert main(["quantize", str(path), "--calibration", missing, "--precision", "int8"]) == 2
    assert "not a file" in capsys.readouterr().err


def test_the_predictor_costs_an_int8_config_at_the_devices_int8_peak(starnet_q) -> None:
    from edgeflex.devices import get_device
    from edgeflex.devices.predictor import _figures, features

    _, path = starnet_q
    with ef.Bundle.open(path) as b:
        c32, c8 = b.config("default").costs, b.config("default@int8").costs
    assert c8["precision"] == "int8" and c8["per_kind"] == c32["per_kind"]
    fig = _figures(get_device("rpi5"), "cpu", "fp32")
    f32, f8 = features(c32, fig), features(c8, fig)
    conv = 0                                    # the first feature: conv FLOPs in ms at the peak used
    assert f8[conv] == pytest.approx(f32[conv] * fig["peaks"]["fp32"] / fig["peaks"]["int8"])
