"""Why the kernel-level predictor misses the plain CNNs at 2 threads (issue 22), from a saved quiet run of
`bench_predictor.py --kernels` (its --work folder: samples-t*.json, kernels-t*.json, context-t*.json);
measures nothing. Per CNN: its measured latency, its kernels timed alone, and the same kernels inside the
graph (ONNX Runtime's profiler); then a leave-one-out, with the bundle's kernels timed (every kernel's own
time known, only the config's latency held out), of the model as it is and of the variants tried, and two
references that a predictor may not use: the held-out config's own in-graph profile, and a fit on the
CNNs alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx  # noqa: F401  (bench_predictor builds the graphs)

from edgeflex.devices import kernel_predictor as kp
from edgeflex.devices.predictor import _solve
from edgeflex.export.kernel_model import kernel_times
from edgeflex.export.kernels import without_graphs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predictor import COPIES, build_configs, unique_kernels
from common import command_line, write_section

SECTION = "## Kernel-level predictor: the plain CNNs at 2 threads (issue 22)"
BLOCK = 16      # ORT's NCHWc block on AVX-512 (8 on AVX2): a Conv runs NCHWc when its channels fit it


class Run:
    """A saved run: per thread count, the configs' p50 (ms) and every kernel's time (the kernel regressor's,
    fitted on all kernels timed alone: what the model uses with the bundle's kernels timed)."""

    def __init__(self, work: Path, per_config: dict, unique: dict, half: int | None = None):
        sel = (lambda v: v) if half is None else (lambda v: v[half::2])
        self.p50, self.kt, self.ctx = {}, {}, {}
        for t in (1, 2):
            try:
                samples = json.loads((work / f"samples-t{t}.json").read_text())["samples"]
                rounds = json.loads((work / f"kernels-t{t}.json").read_text())
                self.ctx[t] = json.loads((work / f"context-t{t}.json").read_text())
            except (OSError, ValueError, KeyError) as e:
                raise SystemExit(f"error: {work} is not a saved bench_predictor.py --kernels run (expected "
                                 f"samples-t{t}.json, kernels-t{t}.json and context-t{t}.json): {e!s:.100}") \
                    from None
            alone = kernel_times({k: sel(v) for k, v in rounds.items() if not k.startswith(COPIES)})
            reg = kp.KernelRegressor.fit([(u["kernel"], alone[k]) for k, u in unique.items() if k in alone])
            self.kt[t] = {k["key"]: reg.predict(k) for ks in per_config.values() for k in ks}
            self.p50[t] = {s["label"]: float(np.median(sel(s["round_p50_ms"]))) for s in samples}


def _blocked(k: dict) -> bool:
    d = k.get("dims") or [0, 0]
    return k["kind"] == "conv" and d[1] % BLOCK == 0 and (d[0] < BLOCK or d[0] % BLOCK == 0)


def _act_kib(k: dict) -> float:
    return max(k.get("bytes", 0) - k.get("weight_bytes", 0), 0) / 1024


Features = Callable[[str, Run, int], tuple[np.ndarray, np.ndarray]]


def variants(per_config: dict) -> dict[str, Features]:
    """name -> (label, run, threads) -> (calibration row, config-space point)."""

    def times(lab: str, run: Run, t: int, fn=None) -> np.ndarray:
        return np.array([run.kt[t][k["key"]] if fn is None else fn(k, run) for k in per_config[lab]])

    class Serial:
        def __init__(self, run: Run):
            self.run = run

        def predict(self, k: dict) -> float:
            return self.run.kt[1][k["key"]]

    def model(fn=None, extra=None):
        def f(lab: str, run: Run, t: int):
            ks = per_config[lab]
            tt = times(lab, run, t, fn if t > 1 else None)
            row = kp._config_row(ks, tt, Serial(run) if t > 1 else None)
            if extra is not None:
                row = np.append(row, 0.0 if (t > 1 and kp._calls(ks) > 1) else extra(ks, run, t))
            return row, kp._config_point(ks, tt)
        return f

    def split_blocked(ks, run, t):     # blocked convs' time moved to a column of their own
        return sum(run.kt[t][k["key"]] for k in ks if _blocked(k))

    def model_split():
        base = model(extra=split_blocked)

        def f(lab, run, t):
            row, pt = base(lab, run, t)
            row[kp.KINDS.index("conv")] -= row[-1] if not (t > 1 and kp._calls(per_config[lab]) > 1) else 0
            return row, pt
        return f

    return {
        "the model (this branch)": model(),
        f"NCHWc convs (channels fit {BLOCK}) in a column of their own": model_split(),
        "convs at their 1-thread time alone":
            model(lambda k, r: r.kt[1 if k["kind"] == "conv" else 2][k["key"]]),
        "2-thread conv time less 0.04 µs per KiB of activations (NCHWc convs; at least half the 1-thread)":
            model(lambda k, r: max(r.kt[2][k["key"]] - (4e-5 * _act_kib(k) if _blocked(k) else 0),
                                   0.5 * r.kt[1][k["key"]]) if k["kind"] == "conv" else r.kt[2][k["key"]]),
        "a column of conv activations MiB that may subtract": model(
            extra=lambda ks, r, t: -sum(_act_kib(k) for k in ks if k["kind"] == "conv") / 1024),
    }


def loo(feat: Features, run: Run, t: int, labels: list[str]) -> dict[str, float]:
    """Leave-one-out (as kernel_predictor.leave_one_out with every kernel's time known): error % by label."""
    rows = [feat(lab, run, t) for lab in labels]
    x, pts = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
    y = np.array([run.p50[t][lab] for lab in labels])
    err = {}
    for i, lab in enumerate(labels):
        keep = np.arange(len(y)) != i
        lin = np.maximum(x @ _solve(x[keep], y[keep], kp.RIDGE), 1e-6)
        st = kp._strength(x[keep], y[keep], pts[keep], kp.RIDGE)
        pred = lin[i] * kp._correction(pts[i], pts[keep], np.log(y[keep] / lin[keep]), st)
        err[lab] = (pred / y[i] - 1) * 100
    return err


def own_profile(per_config: dict) -> Features:
    """Not a predictor: the held-out config's own in-graph kernel times (ORT's profiler) per kind."""
    def f(lab, run, t):
        ks, c = per_config[lab], run.ctx[t][lab]
        row, pt = variants(per_config)["the model (this branch)"](lab, run, t)
        if t == 1 or kp._calls(ks) == 1:
            for i, kind in enumerate(kp.KINDS):
                row[i] = sum(m for k, m in zip(ks, c["ms"]) if k["kind"] == kind)
        return np.append(row, c["extra"]), pt
    return f


def cnn_only(run: Run, per_config: dict, cnns: list[str], t: int, cols: str) -> dict[str, float]:
    """Not the model: a leave-one-out over the CNNs alone of latency = a * X + b (X: `cols`)."""
    x = {"kernels alone (this thread count)": lambda lab: sum(run.kt[t][k["key"]] for k in per_config[lab]),
         "kernels alone at 1 thread": lambda lab: sum(run.kt[1][k["key"]] for k in per_config[lab]),
         "the config's measured 1-thread latency": lambda lab: run.p50[1][lab]}[cols]
    a = np.array([[x(lab), 1.0] for lab in cnns])
    y = np.array([run.p50[t][lab] for lab in cnns])
    out = {}
    for i, lab in enumerate(cnns):
        keep = np.arange(len(y)) != i
        out[lab] = (a[i] @ _solve(a[keep], y[keep], kp.RIDGE) / y[i] - 1) * 100
    return out


def report(work: Path, sampled: int, name: str) -> str:
    configs = build_configs(work)
    per_config, unique = unique_kernels(configs, sampled)
    unique = {k: {**u, "kernel": without_graphs(u["kernel"])}
              for k, u in unique.items()}
    runs = {"all rounds": Run(work, per_config, unique), "even rounds": Run(work, per_config, unique, 0),
            "odd rounds": Run(work, per_config, unique, 1)}
    full = runs["all rounds"]
    labels = list(full.p50[1])
    cnns = [lab for lab in labels if configs[lab]["family"] == "cnn"]
    lines = [f"Command: `{command_line()}`  ",
             f"Data: the saved quiet run `{work}` ({name}; this script measures nothing)", "",
             "Each CNN (µs): measured p50; its kernels timed alone, summed; the same kernels inside the "
             "graph (ORT's profiler, which adds ~1-2 µs a node) plus the nodes of no kernel (layout "
             "reorders); conv kernels alone / in the graph:", "",
             "| config | threads | measured | kernels alone | in the graph (+ other nodes) "
             "| convs: alone / in graph |",
             "|---|---:|---:|---:|---:|---|"]
    for lab in cnns:
        for t in (1, 2):
            ks, c = per_config[lab], full.ctx[t][lab]
            convs = " ".join(f"{full.kt[t][k['key']] * 1e3:.0f}/{m * 1e3:.0f}" for k, m in zip(ks, c["ms"])
                             if k["kind"] == "conv")
            lines.append(f"| {lab} | {t} | {full.p50[t][lab] * 1e3:.0f} | "
                         f"{sum(full.kt[t][k['key']] for k in ks) * 1e3:.0f} | {sum(c['ms']) * 1e3:.0f} "
                         f"(+{c['extra'] * 1e3:.0f}) | {convs} |")
    lines += ["", "Leave-one-out with the bundle's kernels timed, within ±10 % over all "
              f"{len(labels)} configs on all / even / odd rounds, and each CNN's error % (all rounds: "
              + ", ".join(c.removeprefix("cnn-") for c in cnns) + "):", "",
              "| threads | variant | all | even | odd | the CNNs' errors % (all rounds) |",
              "|---:|---|---:|---:|---:|---|"]
    feats = {**variants(per_config), "(not a predictor) the held-out config's own in-graph profile":
             own_profile(per_config)}
    for t in (1, 2):
        for vname, f in feats.items():
            if t == 1 and vname not in ("the model (this branch)",
                                        "(not a predictor) the held-out config's own in-graph profile"):
                continue
            errs = {rn: loo(f, r, t, labels) for rn, r in runs.items()}
            share = [np.mean(np.abs(list(e.values())) <= 10) for e in errs.values()]
            lines.append(f"| {t} | {vname} | " + " | ".join(f"{s:.0%}" for s in share) + " | "
                         + " ".join(f"{errs['all rounds'][c]:+.0f}" for c in cnns) + " |")
    lines += ["", "(Not the model) latency = a x X + b fitted on the other CNNs alone, leave-one-out over "
              "the 7, all rounds, 2 threads:", "", "| X | CNNs within ±10 % | errors % |", "|---|---:|---|"]
    for cols in ("kernels alone (this thread count)", "kernels alone at 1 thread",
                 "the config's measured 1-thread latency"):
        e = cnn_only(full, per_config, cnns, 2, cols)
        lines.append(f"| {cols} | {sum(abs(v) <= 10 for v in e.values())} of {len(e)} | "
                     + " ".join(f"{v:+.0f}" for v in e.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True,
                    help="a saved bench_predictor.py --kernels --work folder (its graphs are rebuilt there)")
    ap.add_argument("--name", default="a quiet run", help="what the run was, as the section should say it")
    ap.add_argument("--sampled", type=int, default=400, help="sampled kernels, as the run timed them")
    ap.add_argument("--out", type=Path, help="RESULTS.md to write the section into")
    args = ap.parse_args()
    body = report(args.work, args.sampled, args.name)
    print(body)
    if args.out:
        # one block per saved run (its folder's name), so the development and the test run sit side by side
        write_section(args.out, SECTION, f"pred_cnn_threads-{args.work.name}", body,
                      script="pred_cnn_threads")


if __name__ == "__main__":
    main()
