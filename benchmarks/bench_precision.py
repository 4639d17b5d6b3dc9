"""Precision as a config (issue 21): StarNet-S1 at 224x224, batch 1, int8 on TVM vs ONNX Runtime fp32 and
ONNX Runtime int8, side by side; top-1 of a corrupted-digits StarNet per precision; bundle bytes per
precision; the CPU flags of the machine.

Usage: .venv/bin/python benchmarks/bench_precision.py [--out benchmarks/RESULTS.md] [--epochs 6] [--runs 60]
       .venv/bin/python benchmarks/bench_precision.py --parts s1 --threads 2 --out benchmarks/RESULTS.md
       (the int8-on-TVM section alone: StarNet-S1 at 2 threads, then 1)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OthersLoad, machine_and_run, publish, time_interleaved, timing_parser  # noqa: E402

import edgeflex as ef  # noqa: E402
from edgeflex.devices.precision import NOTABLE_FLAGS, cpu_flags, host_precisions  # noqa: E402
from edgeflex.export.quantize import quantize  # noqa: E402

SECTION = "## Precision as a config: int8 / fp16 variants (issue 21)"
SECTION_S1 = "## int8 on TVM: StarNet-S1 on edgeflex's int8 kernels (issue 21)"
GOAL_VS_ORT_FP32 = 0.5          # TVM int8 time / ORT fp32 time
GOAL_TOP1_DROP = 0.005          # int8 top-1 change on corrupted digits, as a share (0.5 point)


def bytes_per_precision(path: Path) -> dict[str, int]:
    """Bytes of the files each precision's configs read (fp32: every file no variant added)."""
    with ef.Bundle.open(path) as b:
        files = b.manifest["files"]
        out = {"fp32": 0}
        for rel, meta in files.items():
            if rel.startswith(("profiles/", "engines/")):
                continue
            parts = rel.split("/")
            p = parts[1].split(".")[0] if parts[0] in ("weights", "graphs") and len(parts) > 2 or \
                (parts[0] == "weights" and parts[1].endswith(".bin")) else "fp32"
            p = p if p in ("int8", "fp16", "bf16") else "fp32"
            out[p] = out.get(p, 0) + meta["bytes"]
    return out


def starnet_s1(tmp: Path, a) -> tuple[list[str], list[str], dict]:
    from edgeflex.compile.tvm import compile_bundle
    from edgeflex.models.starnet import starnet

    torch.manual_seed(0)
    model = starnet("s1").eval()
    path = tmp / "s1.efx"
    ef.export(model, torch.randn(1, 3, 224, 224), path, tolerance=1e-3)
    rng = np.random.default_rng(0)
    cal = rng.standard_normal((a.calibration, 3, 224, 224)).astype(np.float32)
    t0 = time.perf_counter()
    report = quantize(path, {"x": cal}, precisions=["int8"], methods=a.methods.split(","), max_drop=100.0,
                      threads=a.threads, progress=False)
    q_s = time.perf_counter() - t0
    v = report.variants[0]
    t0 = time.perf_counter()
    compile_bundle(path, "host", configs=["default@int8"], batch=1, threads=a.threads)
    c_s = time.perf_counter() - t0
    with ef.Bundle.open(path) as b:
        engine = json.loads(b.read(next(r for r in b.manifest["files"]
                                        if r.startswith("engines/tvm/host/") and r.endswith(".json")
                                        and "choice" not in r and "backend" not in r)))
    x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    rows, verdicts, errs = [], [], {}
    # the 2-thread runtimes first, then the 1-thread ones (TVM's thread pool is process-wide)
    for threads in dict.fromkeys([a.threads, 1]):
        ort32 = ef.Runtime(path, threads=threads, only=["default"])
        ort8 = ef.Runtime(path, threads=threads, only=["default@int8"])
        tvm8 = ef.Runtime(path, backend="tvm", threads=threads, only=["default@int8"])
        ref = ort32.run(x)
        errs = {k: float(np.abs(rt.run(x) - ref).max() / np.abs(ref).max())
                for k, rt in (("ORT int8", ort8), ("TVM int8", tvm8))}
        contenders = {"ONNX Runtime fp32": lambda o=ort32: o.run(x),
                      "ONNX Runtime int8 (QDQ)": lambda o=ort8: o.run(x),
                      "TVM int8 (edgeflex int8 kernels)": lambda o=tvm8: o.run(x)}
        with OthersLoad() as load:
            times = time_interleaved(contenders, a.runs, a.warmup, a.block)
        base = float(np.median(times["ONNX Runtime fp32"]))
        rows += [f"| {threads} | {k} | {np.median(t):.2f} | {np.percentile(t, 90):.2f} | "
                 f"{np.median(t) / base:.2f}x |" for k, t in times.items()]
        tvm_ms = float(np.median(times["TVM int8 (edgeflex int8 kernels)"]))
        ort8_ms = float(np.median(times["ONNX Runtime int8 (QDQ)"]))
        verdicts += [
            f"- {threads} thread(s): TVM int8 / ORT fp32 = {tvm_ms / base:.2f}x "
            f"(goal <= {GOAL_VS_ORT_FP32}x: "
            f"{'**met**' if tvm_ms / base <= GOAL_VS_ORT_FP32 else '**not met**'}); ORT int8 / TVM int8 = "
            f"{ort8_ms / tvm_ms:.2f}x (goal > 1: {'**met**' if tvm_ms < ort8_ms else '**not met**'}); "
            f"ORT int8 / ORT fp32 = {ort8_ms / base:.2f}x; others' CPU while timed: {load.share:.0%}",
        ]
    int8_fns = [f for f in engine.get("kernel_functions", [])
                if f.startswith(("qconv", "qlinear", "qstar", "qdwconv"))]
    n_dw8 = sum(f.startswith("qdwconv") for f in int8_fns)
    notes = [f"- TVM int8 engine: rewrites {', '.join(engine.get('kernels', []))}; {len(int8_fns)} int8 "
             f"kernels ({sum(f.startswith('qstar') for f in int8_fns)} fused star blocks: f1, f2, the "
             f"multiply and g in one; {sum(f.startswith('qlinear') for f in int8_fns)} linear; {n_dw8} "
             "depthwise), "
             + ("depthwise convs in int8 (VNNI), their QDQ and residual adds fused" if n_dw8 else
                "depthwise convs in fp32"),
             f"- quantize: {q_s:.0f} s ({a.calibration} random-normal calibration images, untrained "
             f"ImageNet-head weights, methods {a.methods}; chosen: {v.method}); TVM compile of the int8 "
             f"graph: {c_s:.0f} s (batch 1, untuned, edgeflex TIR kernels on)",
             f"- outputs vs ORT fp32 on one random image: ORT int8 {errs['ORT int8']:.3f}, TVM int8 "
             f"{errs['TVM int8']:.3f} (max |diff| / max |fp32|)"]
    return rows, verdicts + notes, bytes_per_precision(path)


def top1_rows(path: Path, report, label) -> list[str]:
    """One table row per variant: its fp32 and own top-1 on the held-out quarter, from its record."""
    rows = []
    with ef.Bundle.open(path) as b:
        for v in report.variants:
            if not v.added:
                rows.append(f"| {label(v)} | {v.precision} | refused: {v.why} | | | | | | |")
                continue
            r = b.config(v.name).quantization["vs_fp32"]
            met = ("**met**" if v.drop <= GOAL_TOP1_DROP else "**not met**") if v.precision == "int8" else ""
            rows.append(f"| {label(v)} | {v.precision} | {v.method} | {r['fp32_quality']:.4f} | "
                        f"{r['variant_quality']:.4f} | {v.drop * 100:+.2f} | {r['argmax_agreement']:.4f} | "
                        f"{r['held_out_samples']} | {met} |")
    return rows


def corrupted_digits(tmp: Path, a) -> tuple[list[str], dict]:
    from edgeflex.models.digits import load_digits_images, train_starnet_digits

    model, q = train_starnet_digits("s050", epochs=a.epochs, corruption="corrupted", progress=False)
    _, _, xte, yte = load_digits_images(32, corruption="corrupted")
    path = tmp / "digits.efx"
    quality = {"metric": "top1", "value": float(q["value"]), "direction": "higher", "split": "test"}
    ef.export(model, torch.from_numpy(xte[:2]), path, quality=quality)
    report = quantize(path, {"x": xte, "y": yte}, precisions=["int8", "fp16"], threads=a.threads,
                      progress=False, max_drop=100.0)
    rows = top1_rows(path, report, lambda v: f"StarNet-S050, corrupted digits ({a.epochs} epochs)")
    return rows, bytes_per_precision(path)


def snnet_digits(tmp: Path, a) -> list[str]:
    """The SN-Net (StarNet-S050 and S100 stitched) trained on corrupted digits: every config's int8 and
    fp16 top-1 on the held-out quarter of its test set."""
    from edgeflex.export.elastic import export_snnet
    from edgeflex.models.digits import load_digits_images
    from edgeflex.models.snnet import train_snnet_digits

    model, q = train_snnet_digits(epochs=a.snnet_epochs, anchor_epochs=a.snnet_epochs, progress=False)
    _, _, xte, yte = load_digits_images(32, corruption="corrupted")
    path = tmp / "sn.efx"
    quality = {c["name"]: {"metric": "top1", "value": float(c["value"]), "direction": "higher",
                           "split": "test"} for c in q["configs"]}
    export_snnet(model, torch.from_numpy(xte[:2]), path, quality=quality)
    report = quantize(path, {"x": xte, "y": yte}, precisions=["int8", "fp16"], threads=a.threads,
                      methods=a.methods.split(","), progress=False, max_drop=100.0)
    return top1_rows(path, report, lambda v: f"SN-Net {v.base} ({a.snnet_epochs}+{a.snnet_epochs} epochs)")


def main() -> None:
    p = timing_parser(__doc__, runs_default="60", warmup=5, block=5)
    p.add_argument("--out", type=Path)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--calibration", type=int, default=32)
    p.add_argument("--methods", default="minmax,percentile")
    p.add_argument("--snnet-epochs", type=int, default=4, help="SN-Net anchor and joint epochs")
    p.add_argument("--parts", default="s1,digits,snnet", help="which parts run (a partial run only prints)")
    a = p.parse_args()
    a.runs = a.runs or 60
    parts = set(a.parts.split(","))
    s1_only = parts == {"s1"}           # `--parts s1 --out`: the int8-on-TVM section alone
    if parts != {"s1", "digits", "snnet"} and not s1_only:
        a.out = None                    # the RESULTS section is one whole run
    started = time.perf_counter()
    torch.set_num_threads(a.threads)
    flags = cpu_flags()
    s1_rows, s1_notes, s1_bytes, dg_rows, dg_bytes, sn_rows = [], [], {}, [], {}, []
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        if "s1" in parts:
            s1_rows, s1_notes, s1_bytes = starnet_s1(Path(tmp), a)
        if "digits" in parts:
            dg_rows, dg_bytes = corrupted_digits(Path(tmp), a)
        if "snnet" in parts:
            sn_rows = snnet_digits(Path(tmp), a)
    table = ["| threads | contender | median ms | p90 ms | / ORT fp32 |", "|---:|---|---:|---:|---:|",
             *s1_rows]
    machine = machine_and_run(
        a.threads, "- cpu flags: " + (", ".join(f for f in NOTABLE_FLAGS if f in flags) or "none"),
        f"- precisions this host runs (devices.precision): {', '.join(host_precisions())}",
        f"- timing: interleaved blocks of {a.block} calls, {a.warmup} warm-up, {a.runs} runs each, order "
        "rotated", started=started)
    if s1_only:
        publish(a.out, SECTION_S1, "bench_precision", "\n".join([
            "StarNet-S1, 224x224, batch 1, untrained weights, int8 calibrated on random-normal images:", "",
            *table, "", *s1_notes, "", *machine]))
        return
    sizes = [f"| {name} | " + " | ".join(f"{b.get(p, 0) / 2**20:.2f}" for p in ("fp32", "int8", "fp16"))
             + " |"
             for name, b in (("StarNet-S1 224 (fp32 + int8)", s1_bytes),
                             ("StarNet-S050 digits (fp32 + int8 + fp16)", dg_bytes))]
    body = "\n".join([
        "StarNet-S1, 224x224, batch 1:", "",
        *table, "", *s1_notes, "",
        "The TVM int8 row runs edgeflex's int8 kernels (docs/precision.md, int8 on TVM).", "",
        "Top-1 per precision on the held-out quarter of the corrupted-digits test set (the other three "
        "quarters calibrate; the fp16 figures come from ONNX Runtime, which on this x86 CPU computes fp16 "
        "nodes in fp32 between fp16 tensors):", "",
        "| model | precision | method | fp32 top-1 | variant top-1 | drop (points) | argmax agreement | "
        "held-out images | goal <= 0.5 point |", "|---|---|---|---:|---:|---:|---:|---:|---|", *dg_rows,
        *sn_rows, "",
        "Bundle bytes per precision (MB; fp32 = the exported files, int8 / fp16 = what `edgeflex quantize` "
        "added):", "", "| bundle | fp32 | int8 | fp16 |", "|---|---:|---:|---:|", *sizes, "",
        *machine,
    ])
    publish(a.out, SECTION, "bench_precision", body)


if __name__ == "__main__":
    main()
