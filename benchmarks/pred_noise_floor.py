"""How repeatable is the kernel-level predictor's ground truth (issue 22)? From saved quiet measurements of
`bench_predictor.py --kernels` (each a --work folder with samples-t*.json and kernels-t*.json), measures
nothing: for the configs (and kernels) timed in two runs, the share whose times agree within ±band %, raw
and after one common scale factor per run pair (a predictor is calibrated on its own run's configs, so a
machine that runs everything x % faster one hour later costs it nothing); within each run, the share whose
median of half the rounds is within ±band % of the other half's (even/odd rounds, and random halves).

If the ground truth agreed with itself on fewer than 90 % of configs, no predictor could reach the goal
(≥ 90 % within ±10 %); the rescaled other run, used as a prediction, is what a perfect model of the
reproducible time would score against one run, give or take that run's own noise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np

from edgeflex.export.kernel_model import OVERHEAD, kernel_times

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, cpu_flag_list, machine_info, write_section

SECTION = "## Kernel-level predictor: the noise floor of its ground truth (issue 22)"
COPIES = "copies:"      # bench_predictor.py's key prefix for kernels timed as copies (not compared here)
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8",
             "amx_bf16", "asimd", "sve")
DATA = (Path("/work/notes/pred-data/q0640"), Path("/work/notes/pred-data/q0911"))


def load(run: Path, t: int) -> tuple[dict[str, dict], dict[str, list[float]]]:
    """A saved run's configs (label -> sample: p50_ms, round_p50_ms, family) and kernels timed alone
    (key -> rounds' p50 ms, with the engine overhead) at `t` threads."""
    try:
        samples = json.loads((run / f"samples-t{t}.json").read_text())["samples"]
        kernels = json.loads((run / f"kernels-t{t}.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {run} is not a saved bench_predictor.py --kernels run at {t} thread(s) "
                         f"(expected samples-t{t}.json and kernels-t{t}.json in it): {e!s:.100}") from None
    return {s["label"]: s for s in samples}, {k: v for k, v in kernels.items() if not k.startswith(COPIES)}


def halves_agree(rounds: list[float], band: float, split: np.ndarray) -> bool:
    """Whether the median of the rounds in `split` is within ±band % of the median of the others."""
    r = np.asarray(rounds, float)
    a, b = np.median(r[split]), np.median(r[~split])
    return abs(a / b - 1) * 100 <= band


def median(rounds: dict[str, list[float]]) -> dict[str, float]:
    return {k: float(np.median(v)) for k, v in rounds.items() if k != OVERHEAD}


def within(ratios: np.ndarray, band: float) -> float:
    return float(np.mean(np.abs(ratios - 1) * 100 <= band))


def cross(a: dict[str, float], b: dict[str, float]) -> tuple[list[str], np.ndarray, float]:
    """Keys in both, b/a per key, and the common scale (geometric median of b/a)."""
    keys = sorted(set(a) & set(b))
    ratio = np.array([b[k] / a[k] for k in keys])
    return keys, ratio, float(np.exp(np.median(np.log(ratio))))


def report(runs: list[Path], band: float, n_random: int) -> str:
    names = [r.name for r in runs]
    info = machine_info(1)
    flags = ", ".join(f for f in CPU_FLAGS if f in (cpu_flag_list() or [])) or "unknown"
    lines = [
        f"Command: `{command_line()}`  ",
        f"Machine (this host; the runs must have been measured on it): {info['cpu']}, {info['cores']}; "
        f"CPU flags: {flags}  ",
        f"Data: the saved quiet runs {', '.join(f'`{r}`' for r in runs)} (`bench_predictor.py --kernels "
        "--rounds 16`, nothing else running; this script measures nothing)  ",
        f"Band: ±{band:g} % (issue 22's goal: ≥ 90 % of configs within it)",
        "",
        "**Between runs** (the same configs, and kernels timed alone, measured in two quiet runs; kernels "
        "as timed, and less the engine's per-run overhead, at least a tenth of their time, as the "
        "predictor uses them; \"rescaled\": the second run's times divided by the two runs' common scale, "
        "the median ratio, which a calibrated predictor absorbs):",
        "",
        "| threads | runs | what | n | common scale | within, raw | within, rescaled | median abs diff, "
        "rescaled % | 90th pct % | worst (rescaled) |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    by_family: list[str] = []
    threads = sorted({int(p.stem.split("-t")[1]) for r in runs for p in r.glob("samples-t*.json")})
    data = {(r.name, t): load(r, t) for r in runs for t in threads}
    for t in threads:
        for ra, rb in itertools.combinations(names, 2):
            (ca, ka), (cb, kb) = data[ra, t], data[rb, t]
            for what, xa, xb in (("configs", {k: s["p50_ms"] for k, s in ca.items()},
                                  {k: s["p50_ms"] for k, s in cb.items()}),
                                 ("kernels, as timed", median(ka), median(kb)),
                                 ("kernels, less overhead (the model's)", kernel_times(ka),
                                  kernel_times(kb))):
                keys, ratio, scale = cross(xa, xb)
                res = ratio / scale
                diff = np.abs(res - 1) * 100
                worst = sorted(zip(keys, res), key=lambda x: -abs(x[1] - 1))[:3]
                worst_s = ", ".join(f"{' '.join(k.split('|')[1:3]) if what != 'configs' else k} "
                                    f"{(r - 1) * 100:+.0f} %"
                                    for k, r in worst)
                lines.append(f"| {t} | {ra} → {rb} | {what} | {len(keys)} | {scale:.3f} | "
                             f"{within(ratio, band):.0%} | **{within(res, band):.0%}** | "
                             f"{np.median(diff):.1f} | "
                             f"{np.percentile(diff, 90):.1f} | {worst_s} |")
                if what == "configs":
                    fam: dict[str, list[float]] = {}
                    for k, r in zip(keys, res):
                        fam.setdefault(ca[k]["family"], []).append(r)
                    by_family.append(f"{t} thread(s), {ra} → {rb}: " + ", ".join(
                        f"{f} {within(np.array(v), band):.0%} of {len(v)}" for f, v in sorted(fam.items())))
    lines += ["", "Configs within ±band %, rescaled, by family: " + "; ".join(by_family) + ".", "",
              f"**Within each run** (the median of half the rounds against the other half's: even vs odd "
              f"rounds, and {n_random} random halves, seeded; configs and kernels timed alone):", "",
              "| threads | run | what | n | rounds | even vs odd | random halves: mean | worst half |",
              "|---:|---|---|---:|---:|---:|---:|---:|"]
    rng = np.random.default_rng(0)
    for t in threads:
        for rn in names:
            configs, kernels = data[rn, t]
            for what, rounds in (("configs", {k: s["round_p50_ms"] for k, s in configs.items()}),
                                 ("kernels", {k: v for k, v in kernels.items() if k != OVERHEAD})):
                n = min(len(v) for v in rounds.values())
                even = np.arange(n) % 2 == 0
                eo = np.mean([halves_agree(v[:n], band, even) for v in rounds.values()])
                shares = []
                for _ in range(n_random):
                    split = np.zeros(n, bool)
                    split[rng.choice(n, n // 2, replace=False)] = True
                    shares.append(np.mean([halves_agree(v[:n], band, split) for v in rounds.values()]))
                lines.append(f"| {t} | {rn} | {what} | {len(rounds)} | {n} | {eo:.0%} | "
                             f"{np.mean(shares):.0%} | {min(shares):.0%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="*", default=list(DATA),
                    help="saved bench_predictor.py --kernels --work folders (default: the two quiet runs)")
    ap.add_argument("--band", type=float, default=10.0, help="± %% band (default 10, the goal's)")
    ap.add_argument("--random-halves", type=int, default=200, help="random half-splits of the rounds")
    ap.add_argument("--out", type=Path, help="RESULTS.md to write the section into")
    args = ap.parse_args()
    if not (args.band > 0 and math.isfinite(args.band)):
        raise SystemExit(f"error: --band {args.band} must be a positive number of %")
    if len(args.runs) < 1:
        raise SystemExit("error: give at least one saved run folder")
    body = report(args.runs, args.band, args.random_halves)
    print(body)
    if args.out:
        write_section(args.out, SECTION, "pred_noise_floor", body)


if __name__ == "__main__":
    main()
