"""Issue 19: the user's own anchors stitched on a task where they differ, and the per-device search's front
against the hand-made configs at the same latency.

Three StarNets written as their authors publish them (tests/authors_starnet.py, no edgeflex class) at three
widths, each pre-trained here as a user would (AdamW, fixed arrays) on corrupted 16x16 digits
(`models/digits.py` CORRUPTIONS["corrupted"]: rotation, scale, shift, contrast cut, an erased patch, noise);
`ef.elastic.stitch` joins them (slow-to-fast, 3 stitches per pair), `ef.export` writes the bundle. Every
config: FLOPs, held-out top-1 from the bundle on ONNX Runtime, p50 latency at batch 1 measured here
(interleaved, `edgeflex profile`'s method): a table and a PNG. Then `ef.search(--pareto)` on half of the
held-out images (the search set) and every config (hand-made and added) scored on the other half (the
report set, image-disjoint: no selection on what is reported) and timed again, side by side.

    .venv/bin/python benchmarks/bench_stitch_user.py [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from authors_starnet import StarNet  # noqa: E402 - the authors' layout, from the tests' copy
from common import OthersLoad, cpu_flag_list, machine_and_run, publish  # noqa: E402

import edgeflex as ef  # noqa: E402
from edgeflex.export import search as search_module  # noqa: E402
from edgeflex.models.digits import TEST_COPIES, corrupt_digits, load_digits_images  # noqa: E402
from edgeflex.runtime.profiles import measure_profile  # noqa: E402

SECTION = "## User anchors stitched, and the per-device search (issue 19)"
ANCHORS = (("small", dict(base_dim=8, depths=[1, 1, 1, 1], mlp_ratio=1)),
           ("medium", dict(base_dim=16, depths=[1, 1, 2, 1], mlp_ratio=2)),
           ("large", dict(base_dim=24, depths=[1, 2, 4, 1], mlp_ratio=3)))
TRAIN_COPIES = 4          # the user's training arrays: this many corrupted copies of each training image


def cpu_flags() -> str:
    """The SIMD flags of /proc/cpuinfo that matter to the kernels timed here."""
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    flags = cpu_flag_list()
    if flags is None:
        return "unknown"
    have = set(flags)
    return ", ".join(f for f in wanted if f in have) + " (absent: " + \
        (", ".join(f for f in wanted if f not in have) or "none") + ")"


def pretrain(net: torch.nn.Module, x: np.ndarray, y: np.ndarray, steps: int, seed: int) -> torch.nn.Module:
    """The user's own training, in their code: AdamW 4e-3, one-cycle, random batches of 64 of the clean
    training images, each corrupted afresh (as `models/digits.py`'s trainers do)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=4e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(yt), (64,), generator=gen)
        xb = corrupt_digits(xt[idx], "corrupted", gen)
        loss = torch.nn.functional.cross_entropy(net(xb), yt[idx], label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def data(size: int, seed: int) -> tuple[np.ndarray, ...]:
    """The clean training images, the stitch's training arrays (corrupted copies), and the held-out images
    split in two by image: search, report."""
    x_train, y_train, x_test, y_test = load_digits_images(size, seed=seed, corruption="corrupted")
    gen = torch.Generator().manual_seed(seed)
    clean = torch.from_numpy(x_train).repeat(TRAIN_COPIES, 1, 1, 1)
    x_tr = corrupt_digits(clean, "corrupted", gen).numpy()
    y_tr = np.tile(y_train, TRAIN_COPIES)
    n = len(y_test) // TEST_COPIES                     # copy-major: row i is image i % n
    image = np.arange(len(y_test)) % n
    first = np.random.default_rng(seed).permutation(n)[: n // 2]
    search = np.isin(image, first)
    return x_train, y_train, x_tr, y_tr, x_test[search], y_test[search], x_test[~search], y_test[~search]


def top1(rt: ef.Runtime, name: str, x: np.ndarray, y: np.ndarray) -> float:
    rt.switch(name)
    pred = np.concatenate([rt.run(x[i:i + 256]) for i in range(0, len(x), 256)])
    return float((pred.argmax(-1) == y).mean())


def plot_configs(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "mflops", "MFLOPs (batch 1)"), (axes[1], "p50_ms", "p50 ms (batch 1)")):
        for kind, marker, color in (("anchor", "s", "tab:blue"), ("stitch", "o", "tab:orange"),
                                    ("not on front", "x", "0.5"), ("found", "*", "tab:red")):
            sel = [r for r in rows if r["kind"] == kind]
            if sel:
                ax.scatter([r[key] for r in sel], [r["top1"] for r in sel], marker=marker, c=color, s=45,
                           label=kind)
        ax.set_xlabel(label)
        ax.set_ylabel("top-1, report half of the corrupted held-out digits")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the section into this RESULTS.md")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--steps", type=int, default=1500, help="pre-training steps per anchor")
    p.add_argument("--epochs", type=int, default=6, help="joint training epochs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    x_clean, y_clean, x_tr, y_tr, x_s, y_s, x_r, y_r = data(a.size, a.seed)
    with OthersLoad() as train_load:
        anchors = [pretrain(StarNet(num_classes=10, **kw), x_clean, y_clean, a.steps, a.seed + i)
                   for i, (_, kw) in enumerate(ANCHORS)]
        sn = ef.elastic.stitch(anchors, (x_tr, y_tr), (x_r, y_r), names=[n for n, _ in ANCHORS], stitches=3,
                               epochs=a.epochs, seed=a.seed)
    work = Path(tempfile.mkdtemp(prefix="bench-stitch-user-"))
    try:
        path, every = work / "user-starnets.efx", work / "every-path.efx"
        ef.export(sn, torch.from_numpy(x_r[:2]), path)
        shutil.copytree(path, every)
        anchors_names = {n for n, _ in ANCHORS}
        with OthersLoad() as search_load:
            result = ef.search(path, (x_s, y_s), pareto_front=True, threads=a.threads,
                               plot=HERE / "stitch_user_search.png")
        added = list(result.added)
        # every path the search scored, added to a copy, so that all are timed and scored side by side
        search_module.add(every, result, [p.name for p in result.points if p.new])
        rt = ef.Runtime(every, threads=a.threads)
        with OthersLoad() as time_load:
            prof = measure_profile(rt, memory=False, min_seconds=0.3 * len(rt.configs))
        rows = []
        for c in rt.configs:
            kind = "anchor" if c.name in anchors_names else ("found" if c.name in added else
                                                              "not on front" if "+" in c.name else "stitch")
            rows.append({"name": c.name, "kind": kind, "mflops": c.flops / 1e6,
                         "top1": top1(rt, c.name, x_r, y_r), "search_top1": result.point(c.name).quality,
                         "p50_ms": prof["configs"][c.name]["p50_ms"]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plot_configs(rows, HERE / "stitch_user.png",
                 f"3 authors' StarNets stitched, corrupted digits {a.size}x{a.size}: every config")
    rows.sort(key=lambda r: r["p50_ms"])
    lines = ["Every config of the stitched bundle (found = added by `ef.search --pareto`; not on front = the "
             "other two-stitch paths it scored, written into a copy to be timed here too), fastest first. "
             "top-1 on the report half of the corrupted held-out digits (900 rows, images disjoint from the "
             "search half the search chose on); p50 at batch 1 measured here in one interleaved profile.", "",
             "| config | kind | MFLOPs | p50 ms | top-1 (report) | top-1 (search half) |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['name']} | {r['kind']} | {r['mflops']:.2f} | {r['p50_ms']:.4f} | {r['top1']:.4f} | "
              f"{r['search_top1']:.4f} |" for r in rows]
    hand = [r for r in rows if r["kind"] in ("anchor", "stitch")]
    lines += ["", "Each path the search scored against the best hand-made config no slower than it (same "
              "profile, report half):", "",
              "| path (kind) | p50 ms | top-1 | best hand-made within its latency | p50 ms | top-1 "
              "| difference |",
              "|---|---:|---:|---|---:|---:|---:|"]
    for r in (r for r in rows if r["kind"] in ("found", "not on front")):
        within = [h for h in hand if h["p50_ms"] <= r["p50_ms"]]
        if within:
            h = max(within, key=lambda h: h["top1"])
            lines.append(f"| {r['name']} ({r['kind']}) | {r['p50_ms']:.4f} | {r['top1']:.4f} | {h['name']} | "
                         f"{h['p50_ms']:.4f} | {h['top1']:.4f} | {r['top1'] - h['top1']:+.4f} |")
        else:
            lines.append(f"| {r['name']} ({r['kind']}) | {r['p50_ms']:.4f} | {r['top1']:.4f} | none as fast "
                         "| | | |")
    found = sum(1 for p in result.points if p.new)
    lines += ["", f"The search scored {found} two-or-more-stitch paths on the search half ({len(y_s)} rows), "
              f"measured the predicted front's, and added {len(added)}: {', '.join(added) or 'none'}. "
              "Predictor: "
              f"{result.predictor['note']}.", "",
              "![every config](stitch_user.png) ![the search](stitch_user_search.png)", "",
              *machine_and_run(a.threads, f"- cpu flags: {cpu_flags()}",
                               f"- anchors: {', '.join(f'{n} {kw}' for n, kw in ANCHORS)}; {a.steps} steps "
                               f"each (batches corrupted afresh); joint training {a.epochs} epochs on "
                               f"{len(y_tr)} rows",
                               f"- other processes' CPU share: training {train_load.share:.0%}, search "
                               f"{search_load.share:.0%}, timing {time_load.share:.0%}",
                               started=started)]
    publish(a.out, SECTION, "bench_stitch_user", "\n".join(lines))


if __name__ == "__main__":
    main()
