"""The `edgeflex` command line: export, train, models, info, run, search, compile, demo, pack/unpack, sign.

Only this module prints (and the verbs it hands on: cli_search.py, cli_train_user.py). Verbs that need
torch (export, demo) or TVM (compile) import them when they run, so `models`, `info`, `run`, `profile`,
`query` and `devices` work on a board with numpy + onnxruntime alone; on such a board those verbs say in one
line which extra to install. A user's mistake (a bad argument, a missing or unreadable file, a bundle that
fails its checks) ends in one line `edgeflex: error: ...`, never
a traceback (`edgeflex --debug VERB ...` re-raises, for developers).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeflex import __version__
from edgeflex.args import check_int, check_real, check_share
from edgeflex.models import registry
from edgeflex.runtime import EdgeflexError, InputError, Runtime, UsageError
from edgeflex.runtime.checks import check_threads

MODELS = tuple(m.name for m in registry.list_models())     # the built-in names (listing imports no torch)


def _table(rows: list[list[str]], header: list[str]) -> str:
    cols = [header, *rows]
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]

    def line(r: list) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(r, widths))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _quality_str(q: dict | None) -> str:
    if not q:
        return "untrained"
    s = f"{q['metric']} {q['value']:.4g} ({q.get('split', 'held-out')})"
    if "baseline" in q:
        s += f" vs {q['baseline']['name']} {q['baseline']['value']:.4g}"
    return s


# --- export ------------------------------------------------------------------------------------------------

def build_model(name: str, *, train: bool, epochs: int | None, seed: int, image_size: int | None,
                progress: bool = True, horizon: int | None = None, data: str | None = None):
    """(model, example input, quality or None, metadata, held-out data or None) for a registered model name
    (`edgeflex.models.create`); an unknown name is refused in one line naming the registered ones."""
    return tuple(registry.create(name, train=train, epochs=epochs, seed=seed, image_size=image_size,
                                 horizon=horizon, data=data, progress=progress))


def cmd_export(a: argparse.Namespace) -> int:
    import edgeflex as ef
    from edgeflex.runtime.store import target

    writable_file("--out", a.out, dir_ok=True)     # before training: a bad path fails in a second, not after
    target(a.out, overwrite=a.force, new=True)      # never over what is not a bundle; a bundle with --force
    model, example, quality, meta, _ = build_model(a.model, train=a.train, epochs=a.epochs, seed=a.seed,
                                                   image_size=a.image_size, horizon=a.horizon, data=a.data)
    kw = {"name": a.name or a.model, "quality": quality, "tolerance": a.tolerance, "metadata": meta,
          "overwrite": a.force, "engine": a.engine}
    bundle = ef.export(model, example, a.out, **kw)     # the registry picks the model's family's exporter
    v = bundle.manifest["export"]["validation"]
    print(f"wrote {bundle.path}  ({bundle.family}, {len(bundle.configs)} config(s), export error "
          f"{v['max_rel_err']:.2e} relative)")
    if (trt := bundle.manifest["export"].get("tensorrt_check")) is not None:
        print(f"  for TensorRT: {trt['graphs']} graph(s), 0 nodes TensorRT {trt['version']}'s ONNX parser "
              f"would reject ({trt['restricted_to_review']} with restrictions to review: edgeflex check "
              f"{a.out} --engine tensorrt)")
    for d in bundle.manifest["export"].get("dropped_outputs", []):
        print(f"  left out output {d['output']} ({d['type']}): not a tensor")
    for c in bundle.configs:
        print(f"  {c.name}: {_quality_str(c.quality)}")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    """Train a family on the user's own data (FITS on a CSV's series; DRESS or SN-Net from the user's models
    on a .npz: `cli_train_user`), export, print the configs."""
    if a.family != "fits":
        from edgeflex.cli_train_user import cmd_train_user

        return cmd_train_user(a)
    from edgeflex.elastic import fits_csv
    from edgeflex.runtime.store import target

    needed = (("--csv", a.csv), ("--lookback", a.lookback), ("--horizon", a.horizon))
    missing = [flag for flag, value in needed if not value]
    if missing:
        raise UsageError(f"train fits needs {', '.join(missing)}")

    writable_file("--out", a.out, dir_ok=True)     # before training, as export
    target(a.out, overwrite=a.force, new=True)
    columns = [c.strip() for c in a.columns.split(",")] if a.columns else None
    fit = fits_csv(a.csv, lookback=a.lookback, horizon=a.horizon, columns=columns, date_column=a.date_column,
                   elastic=a.elastic, period=a.period, cut_freq=a.cut_freq, epochs=a.epochs, seed=a.seed)
    bundle = fit.export(a.out, name=a.name or Path(a.out).name.removesuffix(".efx"), tolerance=a.tolerance,
                        overwrite=a.force)
    v, t, d = bundle.manifest["export"]["validation"], fit.metadata["training"], fit.metadata["data"]
    print(f"trained on {d['rows']} rows of {a.csv} ({', '.join(d['columns'])}): {t['epochs']} epochs (best "
          f"{t['best_epoch']}), {t['train_seconds']} s; split {d['split']}")
    print(f"wrote {bundle.path}  ({bundle.family}, {len(bundle.configs)} config(s), export error "
          f"{v['max_rel_err']:.2e} relative)")
    for c in bundle.configs:
        print(f"  {c.name}: {_quality_str(c.quality)}")
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    """The registered models: a table of name, family, description (or all of each entry, --json)."""
    entries = [(m, registry.get_family(m.family).elastic) for m in registry.list_models()]
    if a.json:
        print(json.dumps([{"name": m.name, "family": m.family, "elastic": elastic,
                           "description": m.description, "always_trains": m.always_trains,
                           "settings": dict(m.settings)}
                          for m, elastic in entries], indent=1))
        return 0
    rows = [[m.name, m.family + (" (elastic)" if elastic else ""), m.description] for m, elastic in entries]
    print(_table(rows, ["model", "family", "description"]))
    return 0


DEVICE_HELP = ("the device the engines are for: host, a catalogue device run on itself (its TVM engines), "
               "or DEVICE:gpu (its GPU's TVM engines; needs TVM's CUDA runtime and the GPU)")
TRUSTED_HELP = ("an Ed25519 public key PEM (repeatable): refuse a bundle not signed by one of them (so does "
                "the board's keys file, $EDGEFLEX_TRUSTED_KEYS or /etc/edgeflex/trusted_keys.pem)")
NATIVE_HELP = "run native code (TVM engines) that another user or machine compiled into the bundle"


# --- info / run --------------------------------------------------------------------------------------------

def cmd_info(a: argparse.Namespace) -> int:
    rt = Runtime(a.bundle, backend=a.backend, device=a.device, threads=a.threads, allow_native=a.allow_native,
                 trusted_keys=a.trusted_key)
    info = rt.info()
    if a.json:
        print(json.dumps(info, indent=1))
        return 0
    m = rt.bundle.manifest
    v = info["export"].get("validation", {})
    print(f"bundle   {info['name']}  ({info['path']})")
    print(f"family   {info['family']}  model {m['model']['class']} {m['model'].get('variant') or ''}"
          f"  parameters {m['model']['parameters']:,}")
    print(f"inputs   {'; '.join(info['inputs'])}")
    print(f"outputs  {'; '.join(info['outputs'])}")
    print(f"export   {info['export'].get('strategy')}, opset {info['export'].get('opset')}, "
          f"max error {v.get('max_abs_err', float('nan')):.2e} abs / "
          f"{v.get('max_rel_err', float('nan')):.2e} "
          f"rel (tolerance {v.get('tolerance')}, {v.get('n_inputs')} inputs)")
    if "kernels" in info["export"]:
        k = info["export"]["kernels"]
        cands = ", ".join(f"{f} {t['batch1_us']:.0f} us" for f, t in k["measured"].items())
        why = f"batch-1 on {k['engine']}: {cands}" if cands else k.get("rule", "")
        print(f"kernel   {k['kernel']} form {k['form']!r} ({why})")
    if (trt := info["export"].get("tensorrt_check")) is not None:
        print(f"engine   exported for TensorRT: {trt['unsupported']} nodes of {trt['graphs']} graph(s) that "
              f"TensorRT {trt['version']}'s ONNX parser would reject ({trt['restricted_to_review']} with "
              "restrictions to review)")
    print(f"tools    {', '.join(f'{k} {v}' for k, v in info['tools'].items())}")
    rows = [[c["name"], c.get("precision", "fp32"), _quality_str(c["quality"]),
             f"{(c['flops'] or 0) / 1e6:.2f}",
             f"{(c['param_bytes'] or 0) / 1024:.1f}", " > ".join(c.get("segments", [])) or c.get("graph", "")]
            for c in info["configs"]]
    print()
    print(_table(rows, ["config", "precision", "quality", "MFLOPs", "param KiB", "runs"]))
    files = m["files"]
    print(f"\nbundle size {sum(f['bytes'] for f in files.values()) / 1024:.1f} KiB in {len(files)} files"
          + (f"; DRESS: dense weights {m['dress']['storage']['dense_weight_bytes'] / 1024:.1f} KiB + level "
             f"codes {m['dress']['storage']['codes_bytes'] / 1024:.1f} KiB" if "dress" in m else ""))
    return 0


def load_npy(path: str) -> np.ndarray:
    """A .npy file's array, its header checked before any byte of data is read: a header that promises
    more bytes than the file holds (a 775 GiB shape in a 1 KiB file), an object dtype (pickle: never
    loaded), an empty or garbage file are refused in one InputError naming the file."""
    def bad(why: str) -> InputError:
        return InputError(f"cannot read input {path!r} as a .npy array: {why}; save one array with np.save")

    with open(path, "rb") as f:                         # OSError (missing, unreadable): main() names it
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise bad("the file is empty")
        if f.read(4) == b"PK\x03\x04":
            raise bad("it is a zip archive (np.savez: .npz), not one array")
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        except (ValueError, EOFError, SyntaxError) as e:
            raise bad(f"no valid .npy header ({' '.join(str(e).split())[:120]})") from None
        if dtype.hasobject:
            raise bad(f"dtype {dtype} holds Python objects, which would need unpickling (refused)")
        need, have = math.prod(shape) * dtype.itemsize, size - f.tell()
        if need > have:
            raise bad(f"its header says shape {list(shape)} {dtype} ({need:,} bytes), the file holds "
                      f"{have:,} bytes of data (truncated or not a .npy file)")
        f.seek(0)
        try:
            return np.load(f, allow_pickle=False)       # never unpickle a user's file
        except (ValueError, EOFError) as e:
            raise bad(" ".join(str(e).split())[:120]) from None


def writable_file(flag: str, path: str, suffix: str = "", *, dir_ok: bool = False) -> Path:
    """The file `path` will be written as (`suffix` added when missing, as np.save does), once its
    directory is known to exist and take a file: checked before any work, so a long run is not lost to a
    typo in the output path. `dir_ok`: `path` may be an existing directory (a bundle, replaced whole)."""
    out = Path(path)
    if suffix and out.suffix != suffix:
        out = out.with_name(out.name + suffix)
    if out.is_dir() and not dir_ok:
        raise UsageError(f"{flag} {path!r} is a directory; expected a file path")
    parent = out.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path!r}: directory {str(parent)!r} does not exist; create it or write "
                         "elsewhere")
    try:
        tempfile.TemporaryFile(dir=parent).close()      # a real probe: os.access says yes to root
    except OSError as e:
        raise UsageError(f"{flag} {path!r}: cannot write in {str(parent)!r} ({e.strerror}); expected a "
                         "writable directory") from None
    return out


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to `path` atomically: a temp file beside it, synced, then renamed over it, so a failed
    write (full disk, interrupt) leaves the old file or none, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cmd_run(a: argparse.Namespace) -> int:
    paths = [writable_file("--output", p, ".npy") for p in a.output or []]
    if len(set(map(os.path.abspath, paths))) != len(paths):
        raise UsageError(f"--output names one file twice ({', '.join(map(str, paths))}): one file per output")
    xs = [load_npy(p) for p in a.input]
    rt = Runtime(a.bundle, backend=a.backend, device=a.device, threads=a.threads, config=a.config,
                 allow_native=a.allow_native, shared_threads=True,  # it owns its process: one ORT pool
                 trusted_keys=a.trusted_key)
    if len(paths) > len(rt.outputs):
        raise UsageError(f"{len(paths)} --output files for {len(rt.outputs)} output(s) "
                         f"({', '.join(o.name for o in rt.outputs)}): give at most one each, in order")
    if len(xs) != len(rt.inputs):
        raise UsageError(f"{len(xs)} --input file(s) for {len(rt.inputs)} input(s) "
                         f"({', '.join(s.describe() for s in rt.inputs)}): give one --input each, in order")
    y = rt.run(*xs)
    outs = y if isinstance(y, tuple) else (y,)
    for p, o in zip(paths, outs):
        save_npy(p, o)
    for i, (spec, o) in enumerate(zip(rt.outputs, outs)):
        print(f"{spec.name}: shape {list(o.shape)} {o.dtype}  min {o.min():.4g}  max {o.max():.4g}  "
              f"mean {o.mean():.4g}" + (f"  -> {paths[i]}" if i < len(paths) else ""))
    return 0


# --- pack / unpack / apply / sign / keygen ------------------------------------------------------------------

def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def cmd_pack(a: argparse.Namespace) -> int:
    from edgeflex.runtime import Bundle
    from edgeflex.runtime.pack import pack_bundle

    with Bundle.open(a.bundle) as b:
        raw = sum(f["bytes"] for f in b.manifest["files"].values())
        out = pack_bundle(b, a.out, base=a.base, force=a.force, level=a.level)
    size = out.stat().st_size
    kind = f"delta against {a.base}" if a.base else "pack"
    print(f"wrote {out}  ({kind}: {_size(size)}; the bundle's {len(b.manifest['files']) + 1} files hold "
          f"{_size(raw)})")
    return 0


def cmd_unpack(a: argparse.Namespace) -> int:
    from edgeflex.runtime.pack import unpack

    print(f"wrote {unpack(a.pack, a.out, force=a.force)}  (every file checked against its sha256)")
    return 0


def cmd_apply(a: argparse.Namespace) -> int:
    from edgeflex.runtime.pack import PACK_SUFFIX, apply_delta, pack_target, write_file

    dest = pack_target(a.out, PACK_SUFFIX, force=a.force)
    write_file(dest, apply_delta(a.base, a.delta, level=a.level), PACK_SUFFIX, force=a.force)
    print(f"wrote {dest}  (rebuilt from {a.base} and {a.delta}; every file checked against its sha256)")
    return 0


def cmd_sign(a: argparse.Namespace) -> int:
    from edgeflex.runtime.sign import sign_path

    kid = sign_path(a.path, a.key)
    print(f"signed {a.path} with key {kid}")
    return 0


def cmd_keygen(a: argparse.Namespace) -> int:
    from edgeflex.runtime.sign import generate_key

    key, pub = generate_key(a.out)
    print(f"wrote {key} (private: keep it on the signing machine) and {pub} (public: copy it to the boards)")
    return 0


# --- profile / query ------------------------------------------------------------------------------------

def _profile_table(stats: dict[str, dict]) -> str:
    rows = [[name, f"{p['p50_ms']:.4f}", f"{p['p90_ms']:.4f}", f"{p['p99_ms']:.4f}", f"{p['mean_ms']:.4f}",
             f"{p['throughput_per_s']:.0f}", f"{p.get('peak_memory_mb', float('nan')):.1f}", str(p["runs"])]
            for name, p in stats.items()]
    return _table(rows, ["config", "p50 ms", "p90 ms", "p99 ms", "mean ms", "per s", "peak MB", "runs"])


def cmd_profile(a: argparse.Namespace) -> int:
    if a.rpc:                               # on boards through TVM's RPC tracker
        from edgeflex.cli_fleet import cmd_profile_remote

        if a.kernels:
            raise UsageError("profile --kernels times kernels with ONNX Runtime on this machine; boards time "
                             "TVM engines only (docs/boards.md, kernel samples): drop --kernels or --rpc")

        return cmd_profile_remote(a)
    from edgeflex.runtime.profiles import measure_profile, profile_path, save_profile, stall_warning

    # one ORT pool for every session, as `edgeflex run` has; several counts need a pool per session
    if a.device != "host":          # a profile measured here is stored under the device's name
        import platform

        from edgeflex.devices import DeviceError, check_device, get_device

        dev = get_device(check_device(a.device).partition(":")[0])
        if dev.arch and dev.arch != platform.machine():
            raise DeviceError(f"a profile of {a.device} is measured on it: this machine is "
                              f"{platform.machine()}, {dev.name} is {dev.arch}; run `edgeflex profile` there")
    # one shared ORT pool, as `run` runs, except with --kernels: at more than one thread the kernel model
    # also times every kernel at 1 thread, on sessions of their own pools (ORT sets the shared pool once
    # per process, so that pool would refuse them)
    rt = Runtime(a.bundle, backend=a.backend, device=a.device, threads=a.threads,
                 shared_threads=not isinstance(a.threads, tuple) and not a.kernels,
                 allow_native=a.allow_native)
    # peak memory is the host process's resident size: not what a GPU's configs cost, so not taken there
    memory = not a.no_memory and not rt.device.endswith(":gpu")
    prof = measure_profile(rt, batch=a.batch, memory=memory, min_seconds=a.min_seconds)
    save_profile(a.bundle, prof)
    stalled = stall_warning(prof)
    for t, stats in prof["by_threads"].items():
        if len(rt.thread_counts) > 1:
            print(f"\nat {t} thread(s):")
        print(_profile_table(stats))
    counts = ", ".join(map(str, rt.thread_counts))
    print(f"\nmeasured on {prof['env']['host']['cpu']} ({rt.backend}, {counts} threads, "
          f"batch {a.batch}); stored as {profile_path(prof['device'])} in {a.bundle}")
    if stalled:
        print(f"warning: {stalled}", file=sys.stderr)
    if a.kernels:
        _profile_kernels(a, rt.thread_counts[0])
    return 0


def _profile_kernels(a: argparse.Namespace, threads: int) -> None:
    """`profile --kernels`: the bundle's kernel-level latency model of this machine, stored in the bundle."""
    try:
        from edgeflex.export.kernel_model import measure_kernel_model
    except ImportError as e:
        raise UsageError(f"profile --kernels builds each kernel as an ONNX graph and needs the export extra "
                         f"({e}); pip install 'edgeflex[export]'") from None
    from edgeflex.runtime.profiles import kernel_model_path, save_kernel_model

    km = measure_kernel_model(a.bundle, device=a.device, threads=threads, rounds=a.kernel_rounds)
    save_kernel_model(a.bundle, km.to_json())
    also = " (the kernels at 1 thread too)" if km.serial is not None else ""
    pairs = len(km.regressor.pairs or [])
    print(f"kernel-level latency model: {len(km.regressor.ms)} kernels timed alone, {pairs} after their "
          f"producers and {km.n_configs} configs whole at {threads} thread(s){also}; stored as "
          f"{kernel_model_path(km.device)} in {a.bundle}")


# --- argument types: a bad value is refused while parsing, in argparse's one line ---------------------------

def arg_type(parse: Callable[[str], object], check: Callable[[object], object], what: str):
    """An argparse `type=`: the text parsed by `parse` (int, float), then checked by `check` (a
    `edgeflex.args` check, called as check(value)); its error message says what is expected."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        try:
            return check(value)
        except UsageError as e:
            raise argparse.ArgumentTypeError(f"expected {getattr(e, 'expected', e)}, got {text!r}") from None

    convert.__name__ = what         # argparse names the type in some messages
    return convert


def int_arg(lo: int, hi: int | None = None):
    return arg_type(int, lambda v: check_int("value", v, lo, hi), "a whole number")


def real_arg(lo: float, hi: float | None = None):
    return arg_type(float, lambda v: check_real("value", v, lo, hi), "a number")


POSITIVE = int_arg(1)
COUNT = int_arg(0)
SEED = int_arg(0, 2**32 - 1)        # numpy's and torch's seeds: non-negative, 32 bits here
LEVEL = int_arg(1, 22)               # zstd compression levels
POSITIVE_REAL = real_arg(0)
MARGIN = arg_type(float, lambda v: check_share("value", v), "a number")
THREADS = arg_type(int, lambda v: check_threads("value", v), "a whole number")


def _threads_arg(text: str) -> int | tuple[int, ...]:
    """--threads: N, or N,M,... (each count's engines loaded and profiled), each in 1..usable cores."""
    try:
        counts = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"threads must be N or N,M,... (whole numbers), got {text!r}") \
            from None
    if len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"threads must be distinct counts, got {text!r}")
    counts = tuple(THREADS(str(t)) for t in counts)
    return counts[0] if len(counts) == 1 else counts


def cmd_query(a: argparse.Namespace) -> int:
    from edgeflex.devices import check_device
    from edgeflex.runtime import Budget

    if a.latency_ms is None and a.memory_mb is None and a.energy_mj is None:
        raise UsageError("query needs a budget: give --latency-ms, --memory-mb and/or --energy-mj")
    rt = Runtime(a.bundle, threads=a.threads)          # runs here; the query is about --device
    budget = Budget(latency_ms=a.latency_ms, memory_mb=a.memory_mb, energy_mj=a.energy_mj)
    hits = rt.query(budget, margin=a.margin, device=check_device(a.device))
    if hits and hits[0]["source"] == "predicted":
        print(f"no profile measured on {a.device}: latencies PREDICTED from the host profile and the device "
              f"description ({hits[0].get('note', '')})", file=sys.stderr)
    if a.json:
        print(json.dumps({"device": a.device, "budget": budget.__dict__, "margin": a.margin, "configs": hits},
                         indent=1))
        return 0
    rows = [[h["name"], h.get("precision", "fp32"), _quality_str(h["quality"]), f"{h['p50_ms']:.4f}",
             f"{h['p90_ms']:.4f}", f"{h.get('peak_memory_mb', float('nan')):.1f}", h["source"]] for h in hits]
    head = ["config", "precision", "quality", "p50 ms", "p90 ms", "peak MB", "latency"]
    print(_table(rows, head) if rows else
          f"no config fits {budget.describe()} on {a.device} (margin {a.margin})")
    return 0 if rows else 1


def cmd_search(a: argparse.Namespace) -> int:
    from edgeflex.cli_search import cmd_search as search

    return search(a)


# --- compile -----------------------------------------------------------------------------------------------

def cmd_compile(a: argparse.Namespace) -> int:
    from edgeflex.compile.tvm import compile_bundle

    if a.backend != "tvm":
        raise EdgeflexError(f"compile --backend {a.backend!r}: only 'tvm' compiles ahead of time "
                            "(onnxruntime needs no compile step)")
    from edgeflex.runtime.progress import bar as progress_bar

    bar, bar_graph = None, None

    def progress(graph: str, done: int, total: int) -> None:
        nonlocal bar, bar_graph
        if a.trials:
            if bar is not None and bar_graph != graph:
                bar.close()
                bar = None
            if bar is None:
                bar, bar_graph = progress_bar(total, graph, unit="trial"), graph
            bar.update(done - bar.n)
        else:
            print(f"  [{done}/{total}] {graph}", flush=True)

    boards = None
    if a.rpc:                               # tune on the boards of an RPC tracker
        from edgeflex.cli_fleet import compile_boards

        boards = compile_boards(a)
    start = time.perf_counter()
    report = compile_bundle(a.bundle, a.target, trials=a.trials, batch=a.batch, configs=a.config,
                            fused=a.fused, dress_kernel=a.dress_kernel, threads=a.threads,
                            kernels=not a.no_kernels, cuda_check=not a.no_cuda_check, batch1=not a.no_batch1,
                            boards=boards, progress=progress)
    if bar is not None:
        bar.close()
    rows = [[e["library"], f"{e['elf']['machine']}", f"{len(e['params'])}",
             ("any + 1" if e.get("batch1") else "any") if e["batch"] is None else str(e["batch"]),
             f"{e['compile_s'] + (e.get('batch1') or {}).get('compile_s', 0):.1f}",
             ", ".join(e["used_by"])[:48]] for e in report["engines"]]
    print(_table(rows, ["library", "arch", "params", "batch", "compile s", "configs"]))
    checks = [e["cuda_check"] for e in report["engines"] if e.get("cuda_check")]
    if checks and "skipped" in checks[0]:
        print(f"\nCUDA C not compiled ahead here: {checks[0]['skipped']}; it compiles on the GPU at load")
    elif checks:
        c, regs = checks[0], max(k["max_registers"] for k in checks)
        print(f"\nCUDA C of every engine compiled for {c['arch']} here ({c['compiler']}): "
              f"{sum(k['kernels'] for k in checks)} kernels, at most {regs} registers, "
              f"{sum(k['spill_store_bytes'] for k in checks)} bytes of spill stores, "
              f"{sum(k['seconds'] for k in checks):.0f} s")
    print(f"\ntarget {report['target']}: {json.dumps(report['target_dict'], separators=(',', ':'))} "
          f"({report['source']}); {len(rows)} engine(s) added to {report['bundle']} in "
          f"{time.perf_counter() - start:.0f} s")
    be = report.get("backends") or {}
    if be.get("faster"):
        print(f"\nTVM vs ONNX Runtime here (batch {be['batch']}, {be['threads']} threads): ONNX Runtime / "
              f"TVM {be['ratio']:.2f}x (geometric mean over configs): --backend auto runs {be['faster']}")
    levels = (report.get("dress_kernels") or {}).get("levels")
    if levels:
        rows = [[name, f"{v['median_us']['dense']:.1f}", f"{v['median_us']['sparse']:.1f}", v["kernel"]]
                for name, v in levels.items()]
        print("\nDRESS levels measured on TVM here (median us per call); the runtime runs the faster:")
        print(_table(rows, ["config", "dense us", "row-sparse us", "runs"]))
    return 0


def cmd_devices(a: argparse.Namespace) -> int:
    from edgeflex.devices import list_rows, load_catalog, render_rows

    if a.json:
        print(json.dumps({n: d.to_json() for n, d in load_catalog().items()}, indent=1))
        return 0
    print(render_rows(list_rows(measure=not a.no_measure)))
    return 0


def cmd_check(a: argparse.Namespace) -> int:
    if a.rpc:                               # every config on a board against ONNX Runtime here
        from edgeflex.cli_fleet import cmd_check_remote

        return cmd_check_remote(a)
    from edgeflex.compile.tensorrt_check import check_bundle, matrix

    try:
        matrix(a.version)
    except ValueError as e:
        raise EdgeflexError(str(e)) from None
    found = check_bundle(a.bundle, a.version)
    if a.json:
        print(json.dumps({g: [vars(f) for f in fs] for g, fs in found.items()}, indent=1))
    else:
        print(f"{'graph':<28} {'node':<28} {'op':<20} {'level':<11} why")
        for g, fs in found.items():
            for f in fs:
                print(f"{g:<28} {f.node:<28} {f.op:<20} {f.level:<11} {f.why}")
    bad = sum(f.level != "restricted" for fs in found.values() for f in fs)
    print(f"{bad} node(s) TensorRT {a.version} would reject or cast, in {len(found)} graph(s)")
    return 1 if bad else 0


# --- demo --------------------------------------------------------------------------------------------------

def cmd_demo(a: argparse.Namespace) -> int:
    """Train FITS on CO2 and StarNet-S050 on digits, export, verify, run held-out data through the
    bundles, time them against PyTorch eager, print one table."""
    import torch

    import edgeflex as ef
    from edgeflex.devices import host_info
    from edgeflex.devices.measure import measure

    out = Path(a.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {a.out!r}: cannot create the directory ({e.strerror}); expected a writable "
                         "path") from None
    writable_file("--out", str(out / "summary.json"))
    start = time.perf_counter()
    rows, summary = [], {}
    for name in ("fits", "starnet-s050"):
        print(f"[{time.perf_counter() - start:5.1f}s] {name}: training on the shipped data ...", flush=True)
        model, example, quality, meta, held = build_model(name, train=True, epochs=None, seed=a.seed,
                                                          image_size=None)
        print(f"[{time.perf_counter() - start:5.1f}s] {name}: exporting and validating ...", flush=True)
        bundle = ef.export(model, example, out / f"{name}.efx", name=name, quality=quality, metadata=meta,
                           overwrite=True)     # the demo's own output (never anything but a bundle)
        rt = Runtime(bundle.path, threads=a.threads)           # re-opened: checksums verified
        bundle_value = registry.get_family(bundle.family).evaluation.evaluate(rt.run, held)
        bundle_q = f"{quality['metric']} {bundle_value:.4g}"
        x1 = example.numpy()
        lat = measure(lambda rt=rt, x1=x1: rt.run(x1), warmup=20, runs=a.runs)
        torch.set_num_threads(rt.threads)
        model.eval()            # eager inference, as the bundle runs (export gives the model back as it was)
        with torch.inference_mode():
            eager = measure(lambda m=model, x=example: m(x), warmup=20, runs=a.runs)
        v = bundle.manifest["export"]["validation"]
        summary[name] = {"quality": quality, "bundle_quality": bundle_value, "export_error": v,
                         "latency_ms": lat, "eager_latency_ms": eager, "threads": rt.threads,
                         "bundle": str(bundle.path)}
        rows.append([name, _quality_str(quality), bundle_q, f"{v['max_rel_err']:.1e}",
                     f"{lat['p50_ms'] * 1e3:.0f}", f"{eager['p50_ms'] * 1e3:.0f}",
                     f"{eager['p50_ms'] / lat['p50_ms']:.1f}x", str(bundle.path)])
    host = host_info()
    (out / "summary.json").write_text(json.dumps({"host": host, "models": summary}, indent=1) + "\n")
    print()
    print(_table(rows, ["model", "quality (PyTorch)", "quality (bundle)", "export err", "p50 us",
                        "eager p50 us", "speed-up", "bundle"]))
    print(f"\nbatch 1, onnxruntime and PyTorch both on {rt.threads} threads on {host['cpu']} "
          f"({host['cores']} cores); {a.runs} runs after warm-up; total {time.perf_counter() - start:.0f} s")
    return 0


# --- entry point -------------------------------------------------------------------------------------------

def _fleet(name: str) -> Callable[[argparse.Namespace], int]:
    """A fleet verb of `edgeflex.cli_fleet`, imported when it runs."""
    def run(a: argparse.Namespace) -> int:
        return getattr(importlib.import_module("edgeflex.cli_fleet"), name)(a)

    return run


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose refusals are one line like every other error of the command (no usage
    block: `--help` shows it). Sub-commands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edgeflex", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"edgeflex {__version__}")
    p.add_argument("--debug", action="store_true", help="let errors raise with their traceback")
    sub = p.add_subparsers(dest="verb", required=True)
    e = sub.add_parser("export", help="export a built-in model into a bundle")
    e.add_argument("--model", required=True, choices=MODELS,
                   help="a registered model (`edgeflex models` lists them with their families)")
    e.add_argument("--out", required=True, help="bundle path, NAME.efx")
    e.add_argument("--force", action="store_true", help="replace the bundle at --out (never anything else)")
    e.add_argument("--train", action="store_true", help="train on the shipped data first (fits: CO2; "
                   "starnet-*: digits at 32x32; dress-*/snnet-* always train)")
    e.add_argument("--epochs", type=POSITIVE)
    e.add_argument("--image-size", type=POSITIVE, help="starnet input size (default 224, or 32 with --train)")
    e.add_argument("--horizon", type=POSITIVE, help="fits-*etth*: forecast horizon (default 96)")
    e.add_argument("--data", help="fits-*etth*: ETTh1.csv / ETTh2.csv or their directory "
                   "(default ../shared/data/ETT beside the repository)")
    e.add_argument("--seed", type=SEED, default=0)
    e.add_argument("--name")
    e.add_argument("--tolerance", type=POSITIVE_REAL, default=1e-4,
                   help="max relative export error (default 1e-4)")
    e.add_argument("--engine", choices=["tensorrt"], help="export the forms TensorRT's ONNX parser takes, "
                   "every graph checked against its operator matrix (default: ONNX Runtime and TVM)")
    e.set_defaults(fn=cmd_export)
    t = sub.add_parser("train", help="train a model on your own data and export it (fits: a CSV's series; "
                       "dress, stitch: your PyTorch models on a .npz)")
    t.add_argument("family", choices=["fits", "dress", "stitch"], help="fits: FITS (--elastic: elastic FITS) "
                   "on a CSV's series; dress: your model nested-sparse; stitch: your anchors as one SN-Net")
    t.add_argument("--csv", help="fits: a CSV: a header row, then one row per time step, oldest "
                   "first (read with the csv module, no pickle)")
    t.add_argument("--npz", help="dress, stitch: a .npz with x_train, y_train, x_val, y_val (no pickle)")
    t.add_argument("--model", help="dress: your model, FILE.py:FUNCTION (called with no argument)")
    t.add_argument("--weights", help="dress: its weights, a .npz of its state_dict")
    t.add_argument("--anchor", action="append", help="stitch: FILE.py:FUNCTION[=WEIGHTS.npz], once per "
                   "anchor, smallest first")
    t.add_argument("--adapter", help="stitch: FILE.py:FUNCTION taking an anchor, returning "
                   "edgeflex.elastic.Layout (default: StarNet's published layout)")
    t.add_argument("--densities", help="dress: the levels, e.g. 1,0.5,0.25,0.1")
    t.add_argument("--direction", default="slow-to-fast", choices=["slow-to-fast", "fast-to-slow", "both"],
                   help="stitch: which anchor goes in front")
    t.add_argument("--stitches", type=POSITIVE, help="stitch: stitches per pair of anchors (default 4)")
    t.add_argument("--columns", help="comma-separated columns to model, in order (default: all but the date "
                   "column)")
    t.add_argument("--date-column", help="a column to skip (default: date, time, timestamp or datetime if "
                   "present)")
    t.add_argument("--lookback", type=POSITIVE, help="fits: input steps L")
    t.add_argument("--horizon", type=POSITIVE, help="fits: forecast steps H")
    t.add_argument("--elastic", action="store_true", help="elastic FITS: one config per cut frequency, the "
                   "weight stored once")
    t.add_argument("--period", type=POSITIVE, help="the base period in steps for the cut frequency (default: "
                   "the training rows' dominant period of at most --lookback steps)")
    t.add_argument("--cut-freq", type=POSITIVE, help="the (largest) cut frequency (default: the paper's rule "
                   "(L // period + 1) * 6 + 10)")
    t.add_argument("--epochs", type=POSITIVE, help="fits: at most this many epochs (default 100, early "
                   "stopping); dress, stitch: the epochs of joint training (default 10)")
    t.add_argument("--out", required=True, help="bundle path, NAME.efx")
    t.add_argument("--force", action="store_true", help="replace the bundle at --out (never anything else)")
    t.add_argument("--seed", type=SEED, default=0)
    t.add_argument("--name")
    t.add_argument("--tolerance", type=POSITIVE_REAL, default=1e-4,
                   help="max relative export error (default 1e-4)")
    t.set_defaults(fn=cmd_train)
    ms = sub.add_parser("models", help="the registered models: name, family, description")
    ms.add_argument("--json", action="store_true")
    ms.set_defaults(fn=cmd_models)
    for verb, fn, help_ in (("info", cmd_info, "show a bundle"), ("run", cmd_run, "run a bundle on a .npy")):
        s = sub.add_parser(verb, help=help_)
        s.add_argument("bundle")
        s.add_argument("--backend", default="onnxruntime")
        s.add_argument("--threads", type=THREADS)
        s.add_argument("--device", default="host", help=DEVICE_HELP)
        s.add_argument("--allow-native", action="store_true", help=NATIVE_HELP)
        s.add_argument("--trusted-key", action="append", help=TRUSTED_HELP)
        s.set_defaults(fn=fn)
        if verb == "info":
            s.add_argument("--json", action="store_true")
        else:
            s.add_argument("--input", required=True, action="append",
                           help="a .npy array (loaded without pickle); once per input of a model with "
                                "several, in the order `info` lists them")
            s.add_argument("--output", action="append",
                           help="write the first output here as .npy; repeat it for the next outputs, in "
                                "order")
            s.add_argument("--config", help="the config to run (default: the bundle's first)")
    pr = sub.add_parser("profile", help="measure every config on this device; store it in the bundle")
    pr.add_argument("bundle")
    pr.add_argument("--backend", default="onnxruntime")
    pr.add_argument("--threads", type=_threads_arg,
                    help="threads (default: the usable cores); several, e.g. 2,1, profile each count, for a "
                         "Runtime(threads=(2, 1)) that chooses the count too")
    pr.add_argument("--batch", type=POSITIVE, default=1)
    pr.add_argument("--min-seconds", type=POSITIVE_REAL, default=0.5,
                    help="least time spent timing each config")
    pr.add_argument("--no-memory", action="store_true", help="skip the per-config peak-memory probe")
    pr.add_argument("--device", default="host", help=DEVICE_HELP + "; the profile is stored under its name")
    pr.add_argument("--allow-native", action="store_true", help=NATIVE_HELP)
    pr.add_argument("--kernels", action="store_true",
                    help="also time every config's fused kernels, alone and after their producers, and "
                         "store the kernel-level latency model (predicts configs without a measured "
                         "profile; needs the export extra)")
    pr.add_argument("--kernel-rounds", type=POSITIVE, default=8, help="with --kernels: shuffled rounds")
    pr.add_argument("--rpc", metavar="HOST:PORT", help="measure on the boards of an RPC tracker (TVM "
                    "engines; configs spread over the free boards under --key)")
    pr.add_argument("--key", help="with --rpc: the boards' key (`edgeflex boards`)")
    pr.set_defaults(fn=cmd_profile)
    q = sub.add_parser("query", help="the configs that fit a budget on a device, best quality first")
    q.add_argument("bundle")
    q.add_argument("--device", default="host")
    q.add_argument("--latency-ms", type=POSITIVE_REAL)
    q.add_argument("--memory-mb", type=POSITIVE_REAL)
    q.add_argument("--energy-mj", type=POSITIVE_REAL)
    q.add_argument("--margin", type=MARGIN, default=0.85,
                   help="fit p90 within margin x budget (default 0.85)")
    q.add_argument("--threads", type=THREADS)
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_query)
    se = sub.add_parser("search", help="search per-layer combinations of configs (DRESS levels, SN-Net "
                        "stitches) for a device; add the front's to the bundle")
    se.add_argument("bundle")
    se.add_argument("--data", required=True, help="held-out data: a .npz with x_val, y_val (no pickle)")
    se.add_argument("--device", default="host", help="host: finalists measured here; a catalogue device: "
                    "latency predicted")
    goal = se.add_mutually_exclusive_group(required=True)
    goal.add_argument("--latency-ms", type=POSITIVE_REAL, help="add the best config within this latency")
    goal.add_argument("--pareto", action="store_true", help="add the new configs on the front")
    se.add_argument("--threads", type=THREADS)
    se.add_argument("--max-candidates", type=POSITIVE, default=128, help="combinations scored (default 128; "
                    "a larger space is sampled)")
    se.add_argument("--max-add", type=POSITIVE, default=6, help="at most this many configs added")
    se.add_argument("--plot", help="write quality against latency here (PNG)")
    se.add_argument("--dry-run", action="store_true", help="search and print; change nothing")
    se.set_defaults(fn=cmd_search)
    c = sub.add_parser("compile", help="compile a bundle's graphs into engines for a target (TVM)")
    c.add_argument("bundle")
    c.add_argument("--backend", default="tvm", help="tvm (the only backend with a compile step)")
    c.add_argument("--target", default="host", help="host, a device (jetson-orin-nano, jetson-agx-orin, "
                   "rpi5, ...: its CPU, cross-compiled) or DEVICE:gpu (CUDA; compile-only here)")
    c.add_argument("--trials", type=COUNT, default=0, help="MetaSchedule tuning trials on this host (default "
                   "0: untuned; records kept in the bundle and reused)")
    c.add_argument("--batch", type=POSITIVE,
                   help="compile for this batch size only (default: any; tuning: 1)")
    c.add_argument("--no-batch1", action="store_true", help="without --batch: do not add the library "
                   "specialised to batch 1 beside the any-batch one (half the compile time and library "
                   "bytes; batch-1 calls ~7 %% slower on small inputs)")
    c.add_argument("--config", action="append", help="compile only this config's graphs (repeatable)")
    c.add_argument("--fused", action="store_true", help="the fused graph of each segmented config")
    c.add_argument("--dress-kernel", choices=["dense", "sparse"], help="DRESS: this kernel for every level")
    c.add_argument("--threads", type=POSITIVE, help="host target's num-cores (default: the usable cores)")
    c.add_argument("--no-cuda-check", action="store_true", help="DEVICE:gpu targets: do not compile the "
                   "engines' CUDA C for the GPU here with nvcc (done by default when nvcc is found)")
    c.add_argument("--no-kernels", action="store_true", help="plain TVM lowering: do not put edgeflex's "
                   "TIR kernels (kernels/tir) in place of the ops they replace")
    c.add_argument("--rpc", metavar="HOST:PORT", help="with --trials: tune on the boards of this RPC tracker "
                   "(MetaSchedule's RPC runner), any --target")
    c.add_argument("--key", help="with --rpc: the boards' key (`edgeflex boards`)")
    c.set_defaults(fn=cmd_compile)
    qz = sub.add_parser("quantize", help="add int8 / fp16 variants of every config, calibrated on your data")
    qz.add_argument("bundle")
    qz.add_argument("--calibration", required=True, help="DATA.npz: the inputs (by name, or x), optionally "
                    "labels or targets y; a quarter is held out to choose the method and measure quality")
    qz.add_argument("--precision", default="int8", help="comma-separated: int8, fp16, bf16 (default int8)")
    qz.add_argument("--max-drop", type=POSITIVE_REAL, help="refuse a variant losing more: top-1 points or "
                    "percent of MSE (default 1 point / 2 %%)")
    qz.add_argument("--methods", default="minmax,percentile,entropy", help="int8 calibration methods tried")
    qz.add_argument("--device", default="host", help="the device the variants are for (its precisions)")
    qz.add_argument("--threads", type=POSITIVE)
    qz.add_argument("--seed", type=SEED, default=0)
    qz.add_argument("--quiet", action="store_true", help="no progress bar")
    qz.set_defaults(fn=lambda a: importlib.import_module("edgeflex.quantize_cli").cmd_quantize(a))
    ck = sub.add_parser("check", help="what TensorRT's ONNX parser would reject in every graph a config runs")
    ck.add_argument("bundle")
    ck.add_argument("--engine", choices=["tensorrt"], default="tensorrt")
    ck.add_argument("--version", default="10.1", help="the TensorRT operator matrix (compile/tensorrt_ops)")
    ck.add_argument("--json", action="store_true")
    ck.add_argument("--rpc", metavar="HOST:PORT", help="instead: run every config's TVM engines on a "
                    "board of this RPC tracker and compare with ONNX Runtime here")
    ck.add_argument("--key", help="with --rpc: the boards' key (`edgeflex boards`)")
    ck.add_argument("--device", default="host", help="with --rpc: whose TVM engines (default: the key if it "
                    "names a catalogue device, else host)")
    ck.add_argument("--tolerance", type=POSITIVE_REAL, default=1e-4,
                    help="with --rpc: max relative difference")
    ck.add_argument("--allow-native", action="store_true", help=NATIVE_HELP)
    ck.set_defaults(fn=cmd_check)
    pk = sub.add_parser("pack", help="pack a bundle into one compressed file NAME.efz (or a delta .efzd)")
    pk.add_argument("bundle", help="a bundle NAME.efx (or a pack NAME.efz)")
    pk.add_argument("--out", required=True, help="NAME.efz; with --base, NAME.efzd")
    pk.add_argument("--base", help="an older pack OLD.efz: write only what it lacks, as a delta")
    pk.add_argument("--force", action="store_true", help="replace the pack at --out (never anything else)")
    pk.add_argument("--level", type=LEVEL, default=9, help="zstd level 1..22 (default 9)")
    pk.set_defaults(fn=cmd_pack)
    up = sub.add_parser("unpack", help="unpack NAME.efz into a bundle directory, every file checked")
    up.add_argument("pack")
    up.add_argument("--out", required=True, help="bundle path, NAME.efx")
    up.add_argument("--force", action="store_true", help="replace the bundle at --out (never anything else)")
    up.set_defaults(fn=cmd_unpack)
    ap = sub.add_parser("apply", help="rebuild a new pack from an old one and a delta")
    ap.add_argument("base", help="the pack the delta was made against, OLD.efz")
    ap.add_argument("delta", help="the delta, D.efzd")
    ap.add_argument("--out", required=True, help="the new pack, NEW.efz")
    ap.add_argument("--force", action="store_true", help="replace the pack at --out (never anything else)")
    ap.add_argument("--level", type=LEVEL, default=9, help="zstd level 1..22 (default 9, as pack)")
    ap.set_defaults(fn=cmd_apply)
    sg = sub.add_parser("sign", help="sign a bundle's or a pack's manifest with an Ed25519 key, in place")
    sg.add_argument("path", help="a bundle NAME.efx or a pack NAME.efz")
    sg.add_argument("--key", required=True, help="a private key PEM (`edgeflex keygen`)")
    sg.set_defaults(fn=cmd_sign)
    kg = sub.add_parser("keygen", help="make an Ed25519 key pair for `edgeflex sign`")
    kg.add_argument("--out", required=True, help="writes OUT.pem (private, 0600) and OUT.pub.pem (public)")
    kg.set_defaults(fn=cmd_keygen)
    tr = sub.add_parser("tracker", help="run TVM's RPC tracker here: boards register, profile/check/compile "
                        "--rpc use them")
    tr.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default loopback: trusted hosts only)")
    tr.add_argument("--port", type=int_arg(1, 65535), default=9190)
    tr.add_argument("--verbose", action="store_true", help="TVM's tracker log")
    tr.set_defaults(fn=_fleet("cmd_tracker"))
    bd = sub.add_parser("board", help="this machine as a board of a fleet: board serve")
    bds = bd.add_subparsers(dest="board_verb", required=True)
    sv = bds.add_parser("serve", help="serve TVM RPC (TVM runtime only) and register with a tracker")
    sv.add_argument("--tracker", required=True, metavar="HOST:PORT")
    sv.add_argument("--key", required=True, help="the key this board registers under, e.g. rpi5")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; give the "
                    "board's address on a trusted network only)")
    sv.add_argument("--port", type=int_arg(1, 65535), help="first port to try (default 9090)")
    sv.add_argument("--name", help="the board's name in profiles (default: host name and process id)")
    sv.add_argument("--verbose", action="store_true", help="TVM's server log")
    sv.set_defaults(fn=_fleet("cmd_board_serve"))
    bs = sub.add_parser("boards", help="the keys and boards an RPC tracker holds, free and busy")
    bs.add_argument("--tracker", required=True, metavar="HOST:PORT")
    bs.add_argument("--json", action="store_true")
    bs.set_defaults(fn=_fleet("cmd_boards"))
    dv = sub.add_parser("devices", help="the described devices (catalogue) and this host")
    dv.add_argument("--json", action="store_true")
    dv.add_argument("--no-measure", action="store_true", help="do not measure this host's peaks")
    dv.set_defaults(fn=cmd_devices)
    from edgeflex.tracecmd import add_trace_parser
    add_trace_parser(sub)                           # `edgeflex trace` (edgeflex/tracecmd.py)
    d = sub.add_parser("demo", help="train, export, verify, run and time the built-in examples")
    d.add_argument("--out", default="edgeflex-demo")
    d.add_argument("--threads", type=THREADS)
    d.add_argument("--runs", type=POSITIVE, default=200)
    d.add_argument("--seed", type=SEED, default=0)
    d.set_defaults(fn=cmd_demo)
    return p


# The extras a verb needs (pyproject.toml) and the modules checked before it runs; and the extra that
# brings each other optional module, should one be missing deeper in.
NEEDS = {"export": ("export", ("torch", "onnx", "onnxscript")),
         "train": ("export", ("torch", "onnx", "onnxscript")),
         "demo": ("export", ("torch", "onnx", "onnxscript")),
         "compile": ("tvm", ("tvm", "onnx")),
         "quantize": ("export", ("onnx",)),
         "search": ("export", ("onnx",))}
EXTRAS = {"torch": "export", "onnx": "export", "onnxscript": "export", "sklearn": "export",
          "statsmodels": "export", "tqdm": "export", "tvm": "tvm", "tvm_ffi": "tvm", "xgboost": "tvm",
          "psutil": "tvm", "matplotlib": "bench"}


def missing_extra(verb: str, module: str) -> str | None:
    """The one line for a verb whose optional `module` is not installed (None: not an optional one)."""
    extra, modules = NEEDS.get(verb, (None, ()))
    extra = extra if module in modules else EXTRAS.get(module)
    if extra is None:
        return None
    return f"edgeflex {verb} needs {module}, which is not installed: pip install 'edgeflex[{extra}]'"


def _check_needs(verb: str) -> None:
    for module in NEEDS.get(verb, (None, ()))[1]:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            line = missing_extra(verb, (e.name or module).partition(".")[0])
            if line is None:
                raise
            raise EdgeflexError(line) from None


def _os_error(verb: str, e: OSError) -> str:
    """An OSError as one line: the path(s) and the system's reason."""
    if e.filename is None:
        return f"{verb}: {e.strerror or e}"
    paths = f"{e.filename!s}" + (f" -> {e.filename2!s}" if e.filename2 is not None else "")
    return f"{verb}: {paths}: {e.strerror or e}"


def _error(text: str) -> None:
    print("edgeflex: error: " + " ".join(str(text).split()), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """The command line. Returns the exit status: 0, 1 (the system refused: a file, memory), 2 (a usage or
    bundle error; argparse's refusals too), 130 (interrupted). Every error is one line on stderr."""
    try:
        a = parser().parse_args(argv)
    except SystemExit as e:             # --help, --version, or an argument refused: argparse has printed
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    if a.debug:
        _check_needs(a.verb)
        return a.fn(a)
    try:
        _check_needs(a.verb)
        return a.fn(a)
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except ModuleNotFoundError as e:
        line = missing_extra(a.verb, (e.name or "").partition(".")[0])
        if line is None:
            raise                       # not an optional dependency: a bug or a broken install
        _error(line)
        return 2
    except EdgeflexError as e:
        _error(str(e))
        return 2
    except OSError as e:
        _error(_os_error(a.verb, e))
        return 1
    except MemoryError as e:
        _error(f"{a.verb}: out of memory{f' ({e})' if str(e) else ''}; try a smaller batch or input")
        return 1


if __name__ == "__main__":
    sys.exit(main())
