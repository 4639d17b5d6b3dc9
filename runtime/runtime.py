"""`Runtime`: open a verified bundle, load every config's engines once, check inputs, switch and run.

A config is a plan: the engines it chains (a plain model: one). All plans are built at start-up from
weights read once, so `switch` only swaps a reference (no reload) and a run that has started keeps the
plan it started with, whatever other threads switch to meanwhile. The board side: numpy and the engine.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edgeflex.args import (
    check_bool,
    check_choice,
    check_int,
    check_names,
    check_path,
    check_real,
    check_share,
    check_str,
    fail,
)
from edgeflex.devices import check_device, host_info, usable_cores
from edgeflex.devices.load import IdleCores
from edgeflex.errors import BundleError, DeviceError, UsageError

from .backends import KNOWN as BACKENDS
from .backends import Backend, Engine, get_backend
from .bundle import Bundle, Config, TensorSpec, model_id
from .checks import check_budget, check_thread_counts
from .plan import Plan, Step, build_plans
from .policy import Adapter, Budget, BudgetError, candidate_key, candidates, fits
from .profiles import (
    kernel_model_path,
    load_kernel_models,
    load_profiles,
    profile_at,
    profile_path,
    profile_threads,
)
from .sign import check_trust
from .tailpolicy import Option, TailGuard

log = logging.getLogger(__name__)


# `fused="auto"`: the most memory the per-config weight copies of fused graphs may take.
AUTO_FUSE_MB = 64
HOLD = 8            # observations that may wait for an observed run with room (or a late one) before a hunt


@dataclass(frozen=True)
class _Plan:
    config: Config
    engines: tuple[Engine, ...]
    extra: tuple[np.ndarray, ...] = ()       # constant inputs after the user's (a DRESS sparse level)
    threads: int = 1
    key: str = ""                            # the policy's name for it: config, or config@<threads>t
    call: Any = None                         # the whole plan as one callable (`Backend.compose`)


class Runtime:
    """`Runtime(path, backend="onnxruntime", device="host", threads=None, config=None)`.

    `path` may be a packed bundle `NAME.efz` (read and verified in memory, see docs/bundles.md).
    `trusted_keys` (Ed25519 public keys: PEM file paths or bytes) and the board's keys file
    (`EDGEFLEX_TRUSTED_KEYS`, else /etc/edgeflex/trusted_keys.pem, when it exists): when either names a
    key, a bundle not signed by one of them is refused; `rt.signed_by` is the key id that signed it.

    `threads` defaults to the cores this process may use; it is always set explicitly on the engine.
    A sequence of counts, e.g. `threads=(2, 1)`, loads every config's engines at each count (memory grows
    with the counts: each engine keeps its own packed weights) and makes the count part of what
    `switch(name, threads=)` and a budget's policy choose: under load on some cores, fewer threads can
    be faster (see `policy.Adapter`). The first count is the one runs start on.
    `config` is the one to start with (default: the bundle's first). `fused=True` runs each config of
    a segmented bundle as its one fused graph (no chaining cost; each config then holds its own copy of
    the weights in memory), where the bundle has fused graphs; `fused=False` chains the shared segments (one
    copy of every weight, a fixed cost per extra engine call: benchmarks/RESULTS.md, Elastic models). The
    default `"auto"` fuses when the backend can load every fused graph and the copies would take at most
    `AUTO_FUSE_MB` (small models, where the per-call cost is a large share of a run), else chains;
    `rt.fused` says which, `rt.fused_reason` why. `dress_kernel` ("dense" or "sparse")
    overrides, for every DRESS level, the kernel measured fastest: by `edgeflex compile` on this backend
    where it measured (TVM, host target), else by the exporter on ONNX Runtime. `only` loads just those
    configs (less memory; switching to another then raises). `allow_native=True` lets a backend that runs
    compiled native code from the bundle (tvm) load code that another user or machine compiled (see README).
    `backend="auto"` runs TVM where `edgeflex compile --target host` measured its engines faster than
    ONNX Runtime on this machine, else ONNX Runtime; `rt.backend` says which, `rt.backend_reason` why.
    `shared_threads=True` (onnxruntime; one thread count) runs every session of the process on ORT's one
    global pool instead of a pool per session: a chained config stops handing the cores from one segment's
    pool to the next, which with a pool per session is most of a large chained config's overhead over its
    fused graph (benchmarks/RESULTS.md, Elastic models; benchmarks/bench_elastic.py). ORT then refuses
    sessions with their own pools anywhere in the process, so it is opt-in; the `edgeflex` command turns it on
    (it owns its process).
    """

    def __init__(self, path: str | os.PathLike | Bundle, backend: str | Backend = "onnxruntime",
                 device: str = "host", *, threads: int | None = None, config: str | None = None,
                 fused: bool | str = "auto", dress_kernel: str | None = None, only: list[str] | None = None,
                 allow_native: bool = False, shared_threads: bool = False,
                 trusted_keys: Sequence[Any] | None = None):
        if not isinstance(path, Bundle):
            check_path("path", path)
        if not isinstance(backend, (str, Backend)):
            fail("backend", backend, f"a backend name: auto, {', '.join(BACKENDS)}")
        check_str("device", device)
        check_str("config", config, none=True)
        check_choice("fused", fused, (True, False, "auto"))
        if dress_kernel is not None:
            check_choice("dress_kernel", dress_kernel, ("dense", "sparse"))
        if only is not None:
            check_names("only", only)
        check_bool("allow_native", allow_native)
        check_bool("shared_threads", shared_threads)
        self.device = check_device(device)
        self.thread_counts = _thread_counts(threads)          # every argument checked before any file read
        self.bundle = path if isinstance(path, Bundle) else Bundle.open(path)
        try:
            self.signed_by = check_trust(self.bundle, trusted_keys)
        except BaseException:
            if not isinstance(path, Bundle):        # ours: let go of it; a caller's stays theirs
                self.bundle.close()
            raise
        self.backend_reason = "asked for"
        if backend == "auto":
            from .backends.tvm import auto_backend

            backend, self.backend_reason = auto_backend(self.bundle, self.device)
        self._backend = get_backend(backend) if isinstance(backend, str) else backend
        self.backend = self._backend.name
        if len(self.thread_counts) > 1 and not self._backend.per_engine_threads:
            raise UsageError(f"backend {self.backend!r} sets one thread count for the whole process; give "
                             f"one count, not {self.thread_counts} (several counts need onnxruntime)")
        self.shared_threads = bool(shared_threads)
        if shared_threads:
            if len(self.thread_counts) > 1:
                raise UsageError(f"shared_threads=True runs every engine of the process on one pool of one "
                                 f"size; give one thread count, not {self.thread_counts}")
        self._backend.open(self.bundle, device=self.device, allow_native=allow_native,
                           shared_threads=self.thread_counts[0] if shared_threads else None)
        start = self.bundle.config(config)
        self.dress_kernel = dress_kernel
        if only is not None:
            for name in only:
                self.bundle.config(name)
            if start.name not in only:
                start = self.bundle.config(only[0])
        self._only = set(only) if only is not None else None
        self.unavailable = self._refuse_precisions(config, only)
        self.fused, self.fused_reason = self._resolve_fused(fused)
        if not self.fused and self._backend.per_engine_threads \
                and max(self.thread_counts) > 1 and any(len(c.segments) > 1 for c in self.bundle.configs):
            self.fused_reason += ("; chained with a thread pool per session, which hands the cores from one "
                                  "segment to the next: shared_threads=True runs them on one pool")
        measured = self._backend.measured
        specs = build_plans(self.bundle, fused=self.fused, only=self._only,
                            kernel=lambda c: self.dress_kernel or measured(c).get("kernel"))
        self._graphs = {name: tuple(s.graph for s in p.steps) for name, p in specs.items()}
        self._plan_sets = {t: self._build_plans(t, specs) for t in self.thread_counts}
        multi = len(self.thread_counts) > 1
        self._by_key = {}
        for t, plans in self._plan_sets.items():
            for name, plan in plans.items():
                plans[name] = plan = replace(plan, threads=t, key=candidate_key(name, t if multi else 0),
                                             call=self._backend.compose(plan.engines, plan.extra))
                self._by_key[plan.key] = plan
        self._plan = self._plan_sets[self.thread_counts[0]][start.name]
        self._adapter: Adapter | TailGuard | None = None
        self._budget_call: dict[str, Any] | None = None
        self._last_arrays: Sequence[np.ndarray] | None = None     # kept while a budget adapts (warm-ups)
        self._free = 0                  # runs left before the budget policy times one again (sampling)
        self._pending: list[tuple[_Plan, float]] = []      # observations the policy has not had yet
        self._hunt = 0                  # HOLD observations wait: runs left timed to find one they are free on
        self._due = 0                   # ... and, meanwhile, runs left before the next observation
        self._warm_switch = False
        self._warmer: threading.Thread | None = None
        self._warm_target: _Plan | None = None
        self._warm_lock = threading.Lock()
        self._warm_event = threading.Event()
        self.budget_met = True
        # Everything is loaded: keep the profiles of this version and let writers remove it once replaced
        # (this runtime never reads the bundle again; `reload_profiles` reads a newer version's).
        self._profiles = load_profiles(self.bundle)
        self._kernel_models = load_kernel_models(self.bundle)
        self.bundle.close()

    # --- loading -----------------------------------------------------------------------------------------

    def _refuse_precisions(self, config: str | None, only: list[str] | None) -> dict[str, str]:
        """{config: why} for the configs whose precision this device or backend does not run natively
        (`devices.precision`, `Backend.precision_refusal`): never loaded, never emulated. Asked for by
        name (`config=`, `only=`): DeviceError, in one line. Else left out of this runtime, with a warning."""
        from edgeflex.devices.precision import device_precisions

        out: dict[str, str] = {}
        have = None
        for c in self.bundle.configs:
            if c.precision == "fp32" or (self._only is not None and c.name not in self._only):
                continue
            have = have if have is not None else device_precisions(self.device)
            why = (f"device {self.device!r} has no {c.precision} arithmetic" if c.precision not in have
                   else self._backend.precision_refusal(c.precision) or self._saturates(c))
            if why is not None:
                out[c.name] = why
        asked = ([config] if config else []) + list(only or [])
        for name in asked:
            if name in out:
                raise DeviceError(f"config {name!r} ({self.bundle.config(name).precision}) cannot run here: "
                                  f"{out[name]}; pick a config of another precision")
        if out:
            log.warning("not loaded (precision not run natively here): %s",
                        "; ".join(f"{n}: {w}" for n, w in out.items()))
            self._only = {c.name for c in self.bundle.configs if c.name not in out
                          and (self._only is None or c.name in self._only)}
        return out

    def _saturates(self, c: Config) -> str | None:
        """Why int8 variant `c` would be off here, or None: its weights use all 8 bits (quantized on a CPU
        with VNNI, or before edgeflex recorded `weight_bits`) and this host's ONNX Runtime u8s8 kernels
        saturate in int16 (`devices.precision.u8s8_saturates`: x86 without VNNI). Measured on a Zen 1 EPYC:
        StarNet's int8 outputs 18-33 % from PyTorch's, FITS's int8 MSE 12 % over its fp32 (sixteenth
        session), where the variant's record promised a drop within its limit."""
        from edgeflex.devices.precision import u8s8_saturates

        if c.precision != "int8" or self.backend != "onnxruntime" or self.device != "host":
            return None
        bits = (c.quantization or {}).get("weight_bits", 8)
        if bits != 8 or not u8s8_saturates():
            return None
        return ("its int8 weights use 8 bits and this CPU (x86 without VNNI) saturates ONNX Runtime's "
                "uint8 x int8 products: quantize it again here (`edgeflex quantize` makes 7-bit weights on "
                "such a CPU)")

    def _resolve_fused(self, fused: bool | str) -> tuple[bool, str]:
        if fused != "auto":
            return bool(fused), "asked for"
        b = self.bundle
        todo = [c for c in b.configs if c.graph is None and c.fused is not None
                and (self._only is None or c.name in self._only)]
        if not todo:
            return False, "no fused graphs in the bundle"
        if not all(self._backend.can_load(b.sha256(c.fused.graph)) for c in todo):
            return False, f"backend {self.backend!r} has no engine for the fused graphs"
        mb = sum(c.param_bytes or 0 for c in todo) / 2**20
        if mb > AUTO_FUSE_MB:
            return False, f"fused copies would take {mb:.1f} MB > {AUTO_FUSE_MB} MB: segments chained"
        return True, f"fused copies take {mb:.1f} MB <= {AUTO_FUSE_MB} MB"

    def _build_plans(self, threads: int, specs: dict[str, Plan]) -> dict[str, _Plan]:
        """Every plan's engines at `threads`: one engine per distinct step, shared by the configs using it."""
        cache: dict[tuple, Engine] = {}

        def load(step: Step) -> Engine:
            if step.key not in cache:
                cache[step.key] = self._backend.load(self.bundle.read(step.graph), step.inputs, step.outputs,
                                                     threads=threads, initializers=step.initializers)
            return cache[step.key]

        return {name: _Plan(p.config, tuple(load(s) for s in p.steps), p.constants)
                for name, p in specs.items()}

    # --- the public surface ------------------------------------------------------------------------------

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self.bundle.inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self.bundle.outputs)

    @property
    def configs(self) -> list[Config]:
        return list(self.bundle.configs)

    @property
    def loaded(self) -> list[str]:
        """The configs this runtime loaded, in bundle order: all but those left out by `only=` or because
        their precision does not run natively here (`unavailable`)."""
        return [c.name for c in self.bundle.configs if c.name in self._plans]

    @property
    def config(self) -> str:
        return self._plan.config.name

    @property
    def threads(self) -> int:
        """The thread count the current config runs at."""
        return self._plan.threads

    def engines(self, name: str | None = None, threads: int | None = None) -> tuple[Engine, ...]:
        """The engines config `name` (default: the current one) runs, in order, at `threads` (default: the
        current count): one for a plain or fused config, one per segment for a chain. Configs that run the
        same graph share its engine (one DRESS sparse engine serves every level)."""
        return self._loaded(name or self.config, threads).engines

    def graphs(self, name: str | None = None) -> tuple[str, ...]:
        """The bundle's graph files config `name` (default: the current one) runs, in order: its own graph,
        its fused graph, its segments' graphs, or the one its family's plan chose (a DRESS level's dense or
        row-sparse graph)."""
        name = name or self.config
        self._loaded(name, None)                # an unknown or unloaded name: its one-line error
        return self._graphs[name]

    @property
    def adapter(self) -> Adapter | TailGuard | None:
        """The budget policy re-selecting the config from observed latencies (`set_budget(adapt=True)`), or
        None without one. Read it (`current`, `fits`, `probes`); `set_budget` changes it."""
        return self._adapter

    @property
    def _plans(self) -> dict[str, _Plan]:
        """The loaded configs at the current thread count."""
        return self._plan_sets[self._plan.threads]

    def switch(self, name: str, threads: int | None = None, *, warm: bool = False) -> None:
        """Make `name` (at `threads`, default: the current count) the config of every run that starts
        from now on. No engine is (re)loaded. `warm=True` first runs it once, on this thread, on the last
        request's arrays (zeros of the inputs' shapes before any), output dropped, so the first request
        after the switch does not pay for waking its thread pool and loading its weights into the caches
        (what a switch costs: benchmarks/RESULTS.md, "Switch costs (issue 20)")."""
        check_str("name", name)
        check_int("threads", threads, 1, none=True)
        check_bool("warm", warm)
        plan = self._loaded(name, threads)
        if warm:
            plan.call(self._warm_arrays())
        self._plan = plan                       # one reference store: atomic under the GIL

    def _warm_arrays(self) -> Sequence[np.ndarray]:
        """The last request's arrays (kept while a budget adapts), else zeros of the inputs' shapes (batch 1
        for a dynamic dimension)."""
        if self._last_arrays is not None:
            return self._last_arrays
        return [np.zeros([1 if d is None or isinstance(d, str) else d for d in s.shape], dtype=s.dtype)
                for s in self.inputs]

    def _warm_then_switch(self, plan: _Plan) -> None:
        """An adapter's switch with `warm_switch`: run `plan` once on a background thread and make it current
        when that run is done (if the adapter still wants it), so the warm-up is off the request path;
        requests go on with the old plan meanwhile (the adapter ignores their latencies). One at a time:
        a switch asked for while one warms replaces the target. The thread is started once per budget
        (`_start_warmer`) and woken here: starting a thread waits until the OS runs it, which took 1-2 ms
        on a loaded core (measured: a late request per switch)."""
        with self._warm_lock:
            self._warm_target = plan
            if self._warmer is None:
                self._start_warmer()
        self._warm_event.set()

    def _start_warmer(self) -> None:
        """The warm-up thread (caller holds `_warm_lock`): it holds only a weak reference to the runtime and
        ends when the runtime is gone, or no budget adapts and nothing waits to be warmed."""
        self._warm_event = event = threading.Event()
        self._warmer = threading.Thread(target=_warm_worker, args=(weakref.ref(self), event),
                                        name="edgeflex-warm", daemon=True)
        self._warmer.start()

    def _warm_pending(self) -> None:
        """Warm the pending target(s) on the warm-up thread; the last one asked for becomes current."""
        arrays = self._warm_arrays()
        while True:
            target = self._warm_target
            if target is None:
                return
            try:
                target.call(arrays)
            except Exception:                # noqa: BLE001 - a warm-up failing must not lose the switch
                log.debug("warm-up run of %s failed", target.key, exc_info=True)
            with self._warm_lock:
                if self._warm_target is target:
                    adapter = self._adapter
                    if adapter is not None and adapter.current == target.key:
                        self._plan = target
                    self._warm_target = None
                    return

    def _loaded(self, name: str, threads: int | None) -> _Plan:
        """The loaded plan of config `name` at `threads` (default: the current count), or the one-line error
        saying it was not loaded (an unknown name: BundleError listing the configs)."""
        if threads is not None and threads not in self._plan_sets:
            raise UsageError(f"threads={threads} was not loaded; this runtime has engines at "
                             f"{', '.join(map(str, self.thread_counts))} threads (Runtime(threads=(...)))")
        plans = self._plan_sets[threads or self._plan.threads]
        plan = plans.get(name)
        if plan is None and name in self.unavailable:
            raise DeviceError(f"config {name!r} cannot run here: {self.unavailable[name]}")
        if plan is None:
            self.bundle.config(name)
            raise UsageError(f"config {name!r} was not loaded (Runtime(only=...)); loaded: "
                             f"{', '.join(plans)}")
        return plan

    def run(self, *arrays: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        """Run one batch through the current config. One array back for a one-output model, else a tuple.
        Raises InputError on bad input."""
        plan = self._plan                       # read once: the whole run uses this config
        if self._adapter is None:
            return plan.call(arrays)
        free = self._free
        if free:                                # sampled (see TailGuard.every): this run is not timed
            self._free = free - 1
            return plan.call(arrays)
        return self._run_plan(plan, arrays)[1]

    def run_config(self, *arrays: np.ndarray) -> tuple[str, np.ndarray | tuple[np.ndarray, ...]]:
        """Like `run`, and also says which config ran (for callers that switch from other threads)."""
        plan = self._plan
        if self._adapter is None:
            return plan.config.name, plan.call(arrays)
        free = self._free
        if free:
            self._free = free - 1
            return plan.config.name, plan.call(arrays)
        return self._run_plan(plan, arrays)

    def _run_plan(self, plan: _Plan, arrays: Sequence[np.ndarray]) \
            -> tuple[str, np.ndarray | tuple[np.ndarray, ...]]:
        """Run `arrays` through `plan`, timed for the budget's adapter. The tail policy observes one run in
        `every` (TailGuard.every); `run` counts the others down in `_free` untimed, one attribute, so that
        they cost 0.1-0.3 us more than a static runtime's (timing every run while an observation waited for
        room cost ~0.4 us a run on a 19 us FITS config: benchmarks/RESULTS.md, fourteenth session). Only
        while HOLD observations wait with no room (a hunt, HOLD sampling periods at most) is every run timed,
        ~0.5 us a run more, for a run they are free on."""
        adapter = self._adapter
        if adapter is None:                     # the budget was lifted by another thread meanwhile
            return plan.config.name, plan.call(arrays)
        pc = time.perf_counter
        t0 = pc()
        out = plan.call(arrays)
        t1 = pc()
        ms = (t1 - t0) * 1e3
        self._last_arrays = arrays
        if type(adapter) is not TailGuard:
            self._observe(adapter, plan, ms)
            return plan.config.name, out
        pending = self._pending
        every, cost = adapter.every, adapter.overhead_ms
        hunt = self._hunt
        if hunt:
            # HOLD observations wait and this run was timed to find a run they are free on; the sampling goes
            # on meanwhile (`_due`)
            due = self._due
            if due:
                self._due = due - 1
            else:
                pending.append((plan, ms + cost / every))
                self._due = every - 1
            self._hunt = hunt = hunt - 1
            budget = adapter.budget
            if ms > budget or ms + 2 * cost <= budget or not hunt:     # (the checks inline: most runs of a
                self._hand_over(adapter, t0, ms, last=not hunt)       # hunt pass them, one call less each)
                if not hunt or len(pending) < HOLD:
                    self._hunt, self._free = 0, self._due
            return plan.config.name, out
        self._free = every - 1
        # the latency the caller sees includes the policy's own bookkeeping: add its running mean per request
        # (an observation's cost over `every`: only the observed request pays it; adding all of it to every
        # kept run made a FITS config of 30 us, observed 1 in 12 at ~4 us, look late 1.2 % for 0.5 %)
        pending.append((plan, ms + cost / every))
        if ms + 2 * cost <= adapter.budget or ms > adapter.budget:     # room, or late anyway (_hand_over)
            self._hand_over(adapter, t0, ms, last=False)
        elif len(pending) >= HOLD:
            # HOLD wait and this run has no room: time the runs of the next HOLD sampling periods, untimed
            # until now, for one late anyway or one with room (FITS at 19 us against 24 us, late 4-13 % of the
            # time in bursts: handed over at once on the next run that would not fit them, one run in HOLD x
            # `every` was late for its bookkeeping alone, 0.07-0.1 points of all requests; hunting one
            # period, 0.03-0.07; HOLD periods, 0.005-0.014: benchmarks/RESULTS.md, fifteenth session)
            self._hunt, self._due, self._free = HOLD * every, every - 1, 0
        return plan.config.name, out

    def _hand_over(self, adapter: TailGuard, t0: float, ms: float, last: bool) -> None:
        """Hand waiting observations over on a timed run of `ms` that began at `t0`, where that is free at the
        budget: as many as twice their mean cost leaves on time, or all of them on a run late anyway; on
        the `last` run of a hunt, all of them whatever that costs (one late run for up to 2 x HOLD of
        them; handed over one at a time where one fit at its mean cost, as before the fifteenth session,
        about half of those runs were late under SN-Net's trace hogs, and the list could only shrink by one
        a run)."""
        budget, cost = adapter.budget, adapter.overhead_ms
        if ms + 2 * cost <= budget:
            self._bookkeep(adapter, t0, max(1, int((budget - ms) / (2 * cost or 1))))
        elif last or ms > budget:
            self._bookkeep(adapter, t0, len(self._pending))

    def _bookkeep(self, adapter: TailGuard, t0: float, most: int) -> None:
        """Hand the waiting observations to the policy, oldest first, `most` of them, on an observed run that
        began at `t0`. Every observation reaches the policy, in order; its latency decides only when (each
        handed over on its own run whatever that cost: FITS at 28 us against a 41 us budget, observed 1 in
        14, had its observed requests late 2.6 % of the time, the others 0.4 %; each made to wait at most
        one observed run: FITS at 19 us against 23 us had ~1 run in 1,400 late for its bookkeeping;
        benchmarks/RESULTS.md, fourteenth session; hence the hunt). The run's whole time, its bookkeeping
        included, tells the policy whether the bookkeeping made it late (`TailGuard.bookkept`)."""
        pending = self._pending
        n = min(most, len(pending))
        if not n:       # set_budget on another thread dropped them meanwhile (they were the old policy's)
            return
        pc = time.perf_counter
        t1 = pc()
        for plan, latency in pending[:n]:
            self._observe(adapter, plan, latency)
        del pending[:n]
        t2 = pc()
        # late for this bookkeeping: on time until it began (judged on the engine's time alone, a run one
        # hand-over made late was charged twice); its cost is not counted on a run late before it
        before = (t1 - t0) * 1e3
        adapter.bookkept((t2 - t1) * 1e3 / n if before <= adapter.budget else None,
                         before <= adapter.budget < (t2 - t0) * 1e3, n)

    def _observe(self, adapter: Adapter | TailGuard, plan: _Plan, latency_ms: float) -> None:
        target = adapter.observe(plan.key, latency_ms)
        if target is not None:
            if self._warm_switch:
                self._warm_then_switch(self._by_key[target])
            else:
                self._plan = self._by_key[target]

    # --- profiles and budgets ----------------------------------------------------------------------------

    def latency_profile(self) -> dict[str, Any] | None:
        """This device's measured profile stored in the bundle (None if there is none, or it was measured
        on another host than this one)."""
        prof = self._profiles.get(profile_path(self.device))
        if prof is not None and self.device == "host":
            here, there = host_info(), prof.get("env", {}).get("host", {})
            if (there.get("cpu"), there.get("cores")) != (here["cpu"], here["cores"]):
                return None
        return prof

    def _kernel_model(self, device: str) -> Any:
        """The bundle's kernel-level model of `device` (None if none; for "host", if timed on another)."""
        km = self._kernel_models.get(kernel_model_path(device))
        if km is not None and device == "host":
            here, there = host_info(), (km.env or {}).get("host", {})
            if (there.get("cpu"), there.get("cores")) != (here["cpu"], here["cores"]):
                return None
        return km

    def predicted_profile(self, device: str) -> dict[str, Any]:
        """A profile for `device` from a latency predictor; says how it was made. With a kernel-level model
        of that device in the bundle (`profiles.save_kernel_model`) and every config's kernels in the
        manifest (costs["kernels"], written at export), from its kernels (devices/kernel_predictor.py);
        otherwise from the operator-level predictor (devices/predictor.py), calibrated on the host profile
        measured in this bundle and transferred by the device description."""
        from edgeflex.devices import get_device
        from edgeflex.devices.predictor import fit

        host = self._profiles.get(profile_path("host"))
        km = self._kernel_model(device)
        # the model's kernels were timed in fp32: a reduced-precision variant's kernels are not those
        if km is not None and self.configs and all((c.costs or {}).get("kernels") and c.precision == "fp32"
                                                   for c in self.configs):
            out = {}
            for c in self.configs:
                ms = km.predict(c.costs["kernels"])
                h = (host or {}).get("configs", {}).get(c.name, {}) if device == "host" else {}
                tail = h.get("p90_ms", 1.0) / h.get("p50_ms", 1.0) if h else 1.1
                out[c.name] = {"p50_ms": ms, "p90_ms": ms * tail,
                               "note": f"kernel-level model of {device} ({len(c.costs['kernels'])} kernels)"}
            return {"device": device, "obtained": "predicted", "configs": out, "env": {"threads": km.threads},
                    "predictor": {"method": "kernels", "kernel_samples": len(km.regressor.ms),
                                  "configs_fitted": km.n_configs}}
        costed = [c for c in self.configs if c.costs is not None]
        if host is None or len(costed) < 2:
            raise BudgetError(f"no profile of bundle {self.bundle.name!r} measured on {device}, and no host "
                              "profile (with per-config costs) to predict from; run `edgeflex profile` here")
        samples = [(c.costs, host["configs"][c.name]["p50_ms"], c.name) for c in costed
                   if c.name in host["configs"]]
        pred = fit(samples, get_device("host"), with_loo=True)
        target = get_device(device)
        out = {}
        for c in costed:
            detail = pred.predict_detail(c.costs, target)
            h = host["configs"].get(c.name, {})
            tail = h.get("p90_ms", 1.0) / h.get("p50_ms", 1.0) if h else 1.1
            out[c.name] = {"p50_ms": detail["ms"], "p90_ms": detail["ms"] * tail, "note": detail["note"]}
        return {"device": device, "obtained": "predicted", "configs": out,
                "predictor": {"fit_error_on_host": pred.to_json()["fit_error"], "samples": len(samples)}}

    def query(self, budget: Budget, *, margin: float = 0.85,
              device: str | None = None) -> list[dict[str, Any]]:
        """The configs that fit `budget` on `device` (default: this runtime's), p90 within margin x latency,
        best quality first. Without a profile measured on that device, the predictor's (each row says)."""
        check_budget(budget)
        check_share("margin", margin)
        check_str("device", device, none=True)
        device = device or self.device
        prof = self.latency_profile() if device == self.device else self._profiles.get(profile_path(device))
        if prof is None and (device != "host" or self._kernel_model(device) is not None):
            prof = self.predicted_profile(device)
        if prof is None:
            raise BudgetError(f"bundle {self.bundle.name!r} has no latency profile measured on this device "
                              f"({self.device}); run `edgeflex profile {self.bundle.path}` first")
        by_name = {c.name: c for c in self.configs}
        stats = (profile_at(prof, self.threads) if device == self.device else None) or prof["configs"]
        here = [c for c in self.configs if device != self.device or c.name not in self.unavailable]
        cands = candidates(here, stats)
        ok = sorted((c for c in cands if fits(c, budget, margin)), key=lambda c: (-c.rank, c.p90_ms))
        return [{"name": c.name, "precision": by_name[c.name].precision, "quality": by_name[c.name].quality,
                 **stats[c.name],
                 "source": prof.get("obtained", "measured")} for c in ok]

    def set_budget(self, budget: Budget | None, *, degrade: bool = False, adapt: bool = True,
                   margin: float | None = None, window: int | None = None, tail: str | None = None,
                   fast_down: int | None = None, os_hint: bool = True, late_share: float | None = 0.01,
                   policy: str | None = None, guarantee: bool = True, warm_switch: bool | None = None) -> str:
        """Switch to the best-quality config that fits `budget` (with a safety margin) and, if `adapt`,
        keep re-selecting from observed latencies. None removes the budget. Returns the config chosen.

        The policy (`policy=None`): `"tail"` (`tailpolicy.TailGuard`, below) when adapting to a budget with
        a latency, unless one of the window policy's settings (`margin`, `window`, `tail`, `fast_down`) is
        given; else `"window"` (`policy.Adapter`; also the static choice of `adapt=False`). On the held-out
        load traces (benchmarks/RESULTS.md, issue 20) the tail policy met all three criteria on 31 of 40
        traces, the window policy on 2 (seeds 5000-5019) and on 1 (seeds 6000-6019).

        The window policy (defaults: margin 0.85, window 32, tail "p90", fast_down 3) re-selects every
        `window` runs from their `tail` percentile, and at once after
        `fast_down` runs in a row over the latency budget (0: windows only); `late_share` also leaves a
        config whose window had more than that share of runs over budget (None: the tail percentile alone);
        see `policy.Adapter`.
        With engines at several thread counts, the choice is (config, threads), each count judged on its
        own profile (`edgeflex profile --threads 2,1`) and its own observed slowdown; `os_hint` lets the
        policy read the OS's idle-core count (`devices.load.IdleCores`) to time its tries of more threads.

        `policy="tail"` adapts with `tailpolicy.TailGuard` instead: it holds the stated tail (at most
        `late_share` of requests over the latency budget, judged on the profiled p99) before quality, from
        measured quantities only (`window`, `margin`, `fast_down` and `tail` do not apply);
        `guarantee=False` lets it try better configs without paying for the trials out of the late
        allowance. `warm_switch` (default: on with policy="tail") runs a config the policy switches to once
        on a background thread before requests go to it (see `switch(warm=True)`).

        Raises BudgetError if nothing fits, unless `degrade=True` (then the fastest config runs and
        `self.budget_met` is False)."""
        call = {k: v for k, v in locals().items() if k != "self"}
        if budget is not None:
            check_budget(budget)
        for flag, value in (("degrade", degrade), ("adapt", adapt), ("os_hint", os_hint)):
            check_bool(flag, value)
        knobs = (margin, window, tail, fast_down) != (None, None, None, None)
        margin = 0.85 if margin is None else margin
        window = 32 if window is None else window
        tail = "p90" if tail is None else tail
        fast_down = 3 if fast_down is None else fast_down
        check_share("margin", margin)
        window = check_int("window", window, 1)
        check_choice("tail", tail, ("p90", "p99"))
        fast_down = check_int("fast_down", fast_down, 0)
        check_real("late_share", late_share, 0, 1, none=True)
        if policy is None:
            latency = budget is not None and budget.latency_ms is not None
            policy = "tail" if adapt and latency and not knobs else "window"
        check_choice("policy", policy, ("window", "tail"))
        check_bool("guarantee", guarantee)
        if warm_switch is not None:
            check_bool("warm_switch", warm_switch)
        self._pending = []                           # observations for the policy being replaced
        self._free = self._hunt = 0
        if budget is None:
            self._adapter, self.budget_met, self._budget_call = None, True, None
            return self.config
        prof = self.latency_profile()
        if prof is None and self._kernel_model(self.device) is not None:
            log.warning("no profile measured on %s: planning on latencies predicted from its kernel-level "
                        "model until one is (`edgeflex profile`)", self.device)
            prof = self.predicted_profile(self.device)
        if prof is None:
            raise BudgetError(f"bundle {self.bundle.name!r} has no latency profile measured on this device "
                              f"({self.device}); run `edgeflex profile {self.bundle.path}` first")
        multi = len(self.thread_counts) > 1
        cands = []
        for t in self.thread_counts:
            stats = profile_at(prof, t)
            if stats is None and not multi:
                log.warning("the %s profile was measured at %s threads, this runtime runs %d: planning on it",
                            self.device, ", ".join(map(str, profile_threads(prof))), t)
                stats = prof["configs"]
            if stats is None:
                raise BudgetError(f"the {self.device} profile of {self.bundle.name!r} has no measurement at "
                                  f"{t} threads (it has: {', '.join(map(str, profile_threads(prof)))}); run "
                                  f"`edgeflex profile {self.bundle.path} --threads {t}`")
            cands += [c for c in candidates(self.configs, stats, tail=tail, threads=t if multi else 0)
                      if c.name in self._plan_sets[t]]
        hint = (IdleCores(min_interval_s=0.05, background=policy == "tail") if multi and os_hint and adapt
                else None)
        self._warm_switch = warm_switch if warm_switch is not None else policy == "tail"
        if self._warm_switch and adapt:
            with self._warm_lock:                  # started now, so that no switch waits for it
                if self._warmer is None:
                    self._start_warmer()
        if policy == "tail":
            return self._set_tail_policy(budget, prof, cands, degrade=degrade, adapt=adapt, hint=hint,
                                         late_share=late_share if late_share is not None else 0.01,
                                         guarantee=guarantee, call=call)
        adapter = Adapter(cands, budget, window=window, margin_hi=margin, margin_lo=margin * 0.9,
                          percentile=float(tail[1:]), degrade=degrade, fast_down=fast_down, idle_cores=hint,
                          late_share=late_share)
        self.budget_met = adapter.fits
        if not adapter.fits:
            log.warning("no config fits %s; running the fastest, %s (degrade=True)", budget.describe(),
                        adapter.current)
        self._plan = self._by_key[adapter.current]
        self._adapter = adapter if adapt else None
        self._budget_call = call
        return self.config

    def _set_tail_policy(self, budget: Budget, prof: dict[str, Any], cands: list, *, degrade: bool,
                         adapt: bool, hint: IdleCores | None, late_share: float, guarantee: bool,
                         call: dict[str, Any]) -> str:
        """set_budget(policy="tail"): options from the profile's p50 and p99 at each thread count (those
        over a memory or energy budget left out), a TailGuard over them."""
        if budget.latency_ms is None:
            raise BudgetError("policy='tail' judges a latency budget; give Budget(latency_ms=...) or use "
                              "policy='window'")
        rest = (budget.memory_mb, budget.energy_mj) != (None, None)
        no_latency = replace(budget, latency_ms=None) if rest else None
        options = []
        for c in cands:
            if no_latency is not None and not fits(c, no_latency, 1.0):
                continue
            stats = profile_at(prof, c.threads or self.thread_counts[0]) or prof["configs"]
            st = stats[c.name]
            options.append(Option(c.key, c.rank, float(st["p50_ms"]), float(st.get("p99_ms", st["p90_ms"])),
                                  c.threads))
        if not options:
            raise BudgetError(f"no config fits the memory/energy part of {budget.describe()}")
        guard = TailGuard(options, budget, late_share=late_share, guarantee=guarantee, idle_cores=hint)
        if not guard.fits and not degrade:
            fastest = guard.opts[guard.current]
            raise BudgetError(f"no config's p99 fits the budget {budget.describe()}: the fastest, "
                              f"{fastest.key!r}, has p99 {guard.profiled_tail(fastest):.3f} ms (its p50 x "
                              "the profile's p99/p50); raise the budget or pass degrade=True")
        self.budget_met = guard.fits
        self._plan = self._by_key[guard.current]
        self._adapter = guard if adapt else None
        self._budget_call = call
        return self.config

    def reload_profiles(self) -> list[str]:
        """Take up the latency profiles of the bundle now at this runtime's path (measured by `edgeflex
        profile` since it was opened); the engines stay as they are. A budget set is planned again on them.
        Returns the profile files that changed. Raises BundleError when the bundle there holds another model
        (re-exported): make a new Runtime to run that one."""
        with Bundle.open(self.bundle.path) as now:
            if model_id(now.manifest) != model_id(self.bundle.manifest):
                raise BundleError(f"bundle {str(self.bundle.path)!r} was re-exported since this runtime "
                                  "opened it: its profiles are of another model; open a new Runtime for it")
            profiles = load_profiles(now)
            self._kernel_models = load_kernel_models(now)
        changed = sorted(rel for rel in {*profiles, *self._profiles}
                         if profiles.get(rel) != self._profiles.get(rel))
        self.bundle, self._profiles = now, profiles
        if self._budget_call is not None:
            self.set_budget(**self._budget_call)
        return changed

    def info(self) -> dict[str, Any]:
        m = self.bundle.manifest
        return {"name": self.bundle.name, "path": str(self.bundle.path), "family": self.bundle.family,
                "backend": self.backend, "backend_reason": self.backend_reason, "device": self.device,
                "threads": self.threads,
                "thread_counts": list(self.thread_counts),
                "config": self.config, "fused": self.fused, "fused_reason": self.fused_reason,
                "unavailable": dict(self.unavailable),
                "inputs": [s.describe() for s in self.inputs],
                "outputs": [s.describe() for s in self.outputs],
                "configs": [c.to_json() for c in self.configs], "export": m.get("export", {}),
                "tools": m.get("tools", {}), "engine_versions": self._backend.versions()}

    def __repr__(self) -> str:
        return (f"Runtime({self.bundle.name!r}, backend={self.backend!r}, device={self.device!r}, "
                f"config={self.config!r}, threads={self.threads})")


def _thread_counts(threads: int | Sequence[int] | None) -> tuple[int, ...]:
    """`threads` as a tuple of distinct counts in 1..usable cores, first kept first (None: the usable
    cores)."""
    if threads is None:
        return (usable_cores(),)
    return check_thread_counts("threads", threads)


def _warm_worker(ref: weakref.ref, event: threading.Event) -> None:
    """`Runtime._warm_then_switch`'s thread: waits for a switch to warm; checks every few seconds whether
    it is still wanted (a weak reference: it never keeps a runtime alive)."""
    while True:
        woke = event.wait(timeout=2.0)
        rt = ref()
        if rt is None:
            return
        if woke:
            event.clear()
            rt._warm_pending()
        else:
            with rt._warm_lock:
                if rt._adapter is None and rt._warm_target is None:
                    rt._warmer = None
                    return
        del rt
