"""`edgeflex search`: the command line's face of `export/search.py` (it prints, as `cli.py` does).

Reads the held-out data from a .npz (x_val, y_val; no pickle), runs the search, prints the front beside the
hand-made configs and what was added to the bundle, and writes the plot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_search(a: argparse.Namespace) -> int:
    from edgeflex.cli import writable_file
    from edgeflex.datafile import load_npz
    from edgeflex.export.search import search

    if a.plot:
        writable_file("--plot", a.plot, ".png")
    data = load_npz(a.data, ("x_val", "y_val"))
    r = search(a.bundle, (data["x_val"], data["y_val"]), device=a.device, latency_ms=a.latency_ms,
               pareto_front=a.pareto, threads=a.threads, max_candidates=a.max_candidates,
               max_add=a.max_add, plot=a.plot, write=not a.dry_run)
    scored = sum(1 for p in r.points if p.new)
    print(f"search {r.bundle} on {r.device}: {scored} new combination(s) scored on {r.data['rows']} rows of "
          f"{a.data}; latency {r.obtained} ({r.threads} threads)")
    if r.obtained == "predicted":
        print(f"  latency predicted: {r.predictor['note']}", file=sys.stderr)
    print(r.table())
    for note in r.notes:
        print(f"note: {note}")
    if r.added:
        verb = "would add" if a.dry_run else f"added to {Path(a.bundle)}"
        print(f"{verb}: {', '.join(r.added)} (weights stored once; `edgeflex profile` times them "
              "for budgets)")
    else:
        print("added nothing: no new combination is on the front" + (
            f" within {a.latency_ms:g} ms" if a.latency_ms is not None else ""))
    if r.plot:
        print(f"plot: {r.plot}")
    return 0
