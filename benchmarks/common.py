"""What every benchmark here shares: interleaved timing, the load other processes put on the machine,
machine facts, and writing one generated section of RESULTS.md without touching the others."""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import numpy as np
import onnxruntime
import torch

import edgeflex as ef
from edgeflex.devices import usable_cores  # noqa: F401 - re-exported for the benchmarks
from edgeflex.devices.load import cpu_ticks

FILE_HEADER = ("# edgeflex benchmark results\n\nOne `##` section per issue, each produced by the script it "
               "names; later issues append their own section.\n")


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat; (0, 0) where there is no /proc."""
    vals = cpu_ticks()
    if vals is None:
        return 0, 0
    total = sum(vals)                         # user nice system idle iowait irq softirq steal
    return total - vals[3] - vals[4], total


class OthersLoad:
    """The share of the machine's CPU time used by other processes while this block runs."""

    def __enter__(self) -> Self:
        self._sys, self._own = _busy_jiffies(), sum(os.times()[:2])
        return self

    def __exit__(self, *exc: object) -> None:
        busy, total = _busy_jiffies()
        tick = os.sysconf("SC_CLK_TCK")
        d_total = (total - self._sys[1]) / tick
        others = (busy - self._sys[0]) / tick - (sum(os.times()[:2]) - self._own)
        self.share = max(0.0, others / d_total) if d_total > 0 else float("nan")


def time_interleaved(contenders: dict[str, Callable[[], object]], runs: int, warmup: int,
                     block: int) -> dict[str, np.ndarray]:
    """Per-call wall times (ms) of each contender, taken in alternating blocks of `block` calls.

    The order of the contenders rotates every round so none always runs right after another.
    """
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    gc.collect()
    gc.disable()
    try:
        for rnd in range(-(-runs // block)):
            for name in order[rnd % len(order):] + order[:rnd % len(order)]:
                fn, out = contenders[name], times[name]
                # NOTE: one untimed call per block absorbs the hand-over from the other engine's thread
                # pool (spinning workers); a deployment runs only one engine, so that cost is not theirs.
                fn()
                for _ in range(min(block, runs - len(out))):
                    t0 = time.perf_counter()
                    fn()
                    out.append((time.perf_counter() - t0) * 1e3)
    finally:
        gc.enable()
    return {name: np.asarray(v) for name, v in times.items()}


def timing_parser(doc: str, *, runs_default: str, warmup: int, block: int) -> argparse.ArgumentParser:
    """The arguments every interleaved-timing benchmark takes: --threads (default: the usable cores, for
    every contender), --runs (default per case, described by `runs_default`), --warmup, --block."""
    usable = usable_cores()
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--threads", type=int, default=usable, help=f"threads, every contender (default {usable})")
    p.add_argument("--runs", type=int, help=f"timed runs per contender (default {runs_default})")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed runs per contender first")
    p.add_argument("--block", type=int, default=block, help="runs per interleaved block")
    return p


def cpu_flag_list() -> list[str] | None:
    """This CPU's feature flags as /proc/cpuinfo lists them (x86 `flags`, aarch64 `Features`); None where the
    file or the line is missing. Each benchmark picks and formats the flags that matter to it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].split() for ln in f
                         if ln.startswith(("flags", "Features"))), None)
    except OSError:
        return None


def machine_info(threads: int) -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    usable = usable_cores()
    return {"cpu": cpu, "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
            "threads": f"{threads} (torch.set_num_threads and ORT intra_op_num_threads; ORT inter_op 1)",
            "versions": (f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, numpy "
                         f"{np.__version__}, Python {platform.python_version()}, edgeflex {ef.__version__}"),
            "os": f"{platform.system()} {platform.release()}"}


def machine_and_run(threads: int, *extra: str, started: float | None = None) -> list[str]:
    """The "Machine and run:" list a RESULTS section ends with: the machine (`machine_info`), the `extra`
    lines, the date (UTC), the wall time since `started` (a time.perf_counter value) if given, the command."""
    import datetime as _dt
    import time

    lines = ["Machine and run:", "", *[f"- {k}: {v}" for k, v in machine_info(threads).items()], *extra,
             f"- date: {_dt.datetime.now(_dt.UTC).isoformat(timespec='minutes')}"]
    if started is not None:
        lines.append(f"- wall time: {time.perf_counter() - started:.0f} s")
    return [*lines, f"- command: `{command_line()}`"]


def command_line() -> str:
    exe = os.path.relpath(sys.executable) if not os.path.relpath(sys.executable).startswith("..") \
        else sys.executable
    return shlex.join([exe, *sys.argv])


def write_section(path: Path, section: str, key: str, body: str, script: str | None = None) -> None:
    """Put `body` between the `key` markers under `section` of `path`, keeping every other section and any
    hand-written text after the end marker; create the file or the section if missing. `script`: the
    benchmark that writes it, where its name is not `key`."""
    begin = f"<!-- {key}:begin (generated by benchmarks/{script or key}.py --out; edit below END) -->"
    end = f"<!-- {key}:end -->"
    text = path.read_text() if path.exists() else FILE_HEADER
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    elif section in text:
        text = text.replace(section, f"{section}\n\n{block}", 1)
    else:
        text = text.rstrip("\n") + f"\n\n{section}\n\n{block}\n"
    path.write_text(text)


def publish(out: Path | None, section: str, key: str, body: str) -> None:
    """Print the section, and write it into `out` (RESULTS.md) when given."""
    print(f"{section}\n\n{body}")
    if out:
        write_section(out, section, key, body)
