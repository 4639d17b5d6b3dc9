"""SN-Net accuracy across training seeds (issue 3): does the accuracy-FLOPs curve interpolate between the
anchors, or is what one run shows within run-to-run noise?

Trains the SN-Net recipe (`models/snnet.py train_snnet_digits`: anchors, least-squares stitches, joint
training) once per seed, each seed in its own process at 1 torch thread, `--jobs` at a time, and reports
per config the held-out top-1 of every seed, mean and standard deviation, and how many seeds put it inside
the anchors' range; plus a PNG of top-1 vs FLOPs with the spread. The seed changes the anchors'
initialisation, the train/test split, the corruptions and the sampling of joint training.

Owns its section of RESULTS.md; changes no library code. ~5 min per seed on one core of this host.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_and_run, publish  # noqa: E402

SECTION = "## SN-Net across seeds (issue 3): is the curve signal or noise?"

ONE_SEED = """
import json, sys
from edgeflex.models.snnet import train_snnet_digits
anchors, seed, epochs = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3])
kw = json.loads(sys.argv[4])
_, r = train_snnet_digits(anchors, seed=seed, epochs=epochs, progress=False, **kw)
print(json.dumps({"configs": [{k: c[k] for k in ("name", "value", "flops")} for c in r["configs"]],
                  "anchor_top1": r["anchor_top1"], "seconds": r["train_seconds"]}))
"""


def train_seed(anchors: str, seed: int, epochs: int, extra: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", ONE_SEED, anchors, str(seed), str(epochs), json.dumps(extra)],
                         capture_output=True, text=True, env=env, check=True, timeout=3600)
    return {"seed": seed, **json.loads(out.stdout.strip().splitlines()[-1])}


def table(runs: list[dict]) -> tuple[list[str], dict]:
    names = [c["name"] for c in runs[0]["configs"]]
    flops = {c["name"]: c["flops"] for c in runs[0]["configs"]}
    top1 = {n: np.array([{c["name"]: c["value"] for c in r["configs"]}[n] for r in runs]) for n in names}
    small, large = top1[names[0]], top1[names[-1]]
    lo, hi = np.minimum(small, large), np.maximum(small, large)
    seeds = ", ".join(str(r["seed"]) for r in runs)
    lines = [f"| config | MFLOPs | top-1, seeds {seeds} | mean | std | seeds inside the anchors' range | "
             "seeds below the smaller anchor |", "|---|---:|---|---:|---:|---:|---:|"]
    summary = {}
    for n in names:
        v = top1[n]
        inside = int(((v >= lo) & (v <= hi)).sum())
        below = int((v < small).sum())
        summary[n] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                      "inside": inside, "below": below, "flops": flops[n]}
        anchor = n in (names[0], names[-1])
        lines.append(f"| {n} | {flops[n] / 1e6:.2f} | {' / '.join(f'{x:.4f}' for x in v)} | "
                     f"**{v.mean():.4f}** | {summary[n]['std']:.4f} | "
                     f"{'(anchor)' if anchor else f'{inside}/{len(v)}'} | "
                     f"{'(anchor)' if anchor else f'{below}/{len(v)}'} |")
    return lines, summary


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    x = [summary[n]["flops"] / 1e6 for n in names]
    y = [summary[n]["mean"] for n in names]
    e = [summary[n]["std"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.errorbar(x, y, yerr=e, fmt="o-", capsize=3)
    for xi, yi, n in zip(x, y, names):
        ax.annotate(n, (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("MFLOPs (32x32)")
    ax.set_ylabel("held-out top-1 (mean ± std over seeds)")
    ax.set_title("SN-Net configs across seeds")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--anchors", default="s050,s100")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--epochs", type=int, default=30, help="joint-training epochs")
    p.add_argument("--jobs", type=int, default=2, help="seeds trained at once (one core each)")
    p.add_argument("--recipe", default="{}", help='extra train_snnet_digits arguments as JSON, e.g. '
                   '\'{"distill": 0.5}\'')
    p.add_argument("--reuse", type=Path, nargs="+", default=[],
                   help="JSONs of runs written by earlier --save runs, reported with the seeds trained now")
    p.add_argument("--save", type=Path, help="write the runs as JSON here")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    start = time.perf_counter()
    runs = [r for path in a.reuse for r in json.loads(path.read_text())]
    seeds = [int(s) for s in a.seeds.split(",") if s] if a.seeds else []
    seeds = [s for s in seeds if s not in {r["seed"] for r in runs}]
    extra = json.loads(a.recipe)
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        runs += list(pool.map(lambda s: train_seed(a.anchors, s, a.epochs, extra), seeds))
    runs.sort(key=lambda r: r["seed"])
    if a.save:
        a.save.write_text(json.dumps(runs, indent=1))
    lines, summary = table(runs)
    names = list(summary)
    stitched = names[1:-1]
    png = (a.out.parent if a.out else Path("benchmarks")) / "snnet_seeds.png"
    plot(summary, png)
    gap = summary[names[-1]]["mean"] - summary[names[0]]["mean"]
    worst = min(stitched, key=lambda n: summary[n]["mean"])
    spread = float(np.median([summary[n]["std"] for n in names]))
    seconds = ", ".join(f"{r['seconds']:.0f} s" for r in runs)
    body = "\n".join([
        f"Anchors {a.anchors}, {a.epochs} joint epochs, recipe {a.recipe}, {len(runs)} seeds "
        f"({seconds} of training each, 1 thread).", "", *lines, "",
        f"The larger anchor beats the smaller by {gap:+.4f} on average; the median std of a config across "
        f"seeds is {spread:.4f}. Stitched configs inside the anchors' range: "
        f"{sum(summary[n]['inside'] for n in stitched)}/{len(stitched) * len(runs)} (config x seed); below "
        f"the smaller anchor: {sum(summary[n]['below'] for n in stitched)}/{len(stitched) * len(runs)}; "
        f"lowest mean: {worst} {summary[worst]['mean']:.4f}.", "",
        f"![SN-Net across seeds]({png.name})", "",
        *machine_and_run(1, started=start)])
    publish(a.out, SECTION, "snnet_seeds", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
