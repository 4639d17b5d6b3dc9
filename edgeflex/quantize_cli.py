"""`edgeflex quantize BUNDLE --calibration DATA.npz [--precision int8,fp16] [--max-drop X]`: the command
around `edgeflex.export.quantize.quantize`, printing one row per variant (added or refused, with its
numbers). Exit status 1 when a variant was refused, 0 when every one was added."""

from __future__ import annotations

import argparse


def cmd_quantize(a: argparse.Namespace) -> int:
    from edgeflex.export.quantize import quantize

    precisions = [p.strip() for p in a.precision.split(",") if p.strip()]
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    report = quantize(a.bundle, a.calibration, precisions=precisions, max_drop=a.max_drop, device=a.device,
                      methods=methods, threads=a.threads or 1, seed=a.seed, progress=not a.quiet)
    rows = []
    for v in report.variants:
        drop = "" if v.drop is None else (f"{v.drop * 100:.2f} pt" if v.metric == "top1"
                                          else f"{v.drop * 100:.2f} %")
        err = v.vs_fp32.get("max_rel_err")
        rows.append([v.name, "added" if v.added else "REFUSED", v.method or "", drop,
                     "" if err is None else f"{err:.3g}", f"{v.bytes / 2**20:.2f}" if v.added else "",
                     v.why])
    header = ["config", "status", "method", f"{report.variants[0].metric or 'quality'} drop",
              "max rel err vs fp32", "weights MB", "why"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    if report.bundle is not None:
        where = report.bundle.path
        print(f"wrote {where}: run `edgeflex profile {where}` to time the new configs")
        # TVM engines compiled before this have none for the new configs: Runtime(backend="tvm") refuses
        # the bundle until they are compiled too
        from edgeflex.runtime.backends.tvm import compiled_targets

        for t in compiled_targets(report.bundle):
            print(f"its TVM engines for {t!r} do not cover the new configs: run `edgeflex compile {where} "
                  f"--target {t}` before running it with --backend tvm")
    return 1 if report.refused else 0
