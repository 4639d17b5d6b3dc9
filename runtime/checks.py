"""Input checks run before any engine sees an array: count, type, dtype, shape, finiteness.

float64 is refused, not cast: a silent cast hides a 2x memory copy and a precision change from the
caller. The error says how to cast.

The checks run on every call, so the happy path is kept to a few C-level operations (a small model's whole
call takes microseconds, so the checks are a visible share of it: FITS at batch 1 on TVM,
benchmarks/RESULTS.md, FITS TIR kernel). Anything that fails it is re-checked by `_explain`, which names the
problem.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from operator import itemgetter
from typing import Any

import numpy as np

from edgeflex.args import fail, is_int
from edgeflex.devices import usable_cores
from edgeflex.errors import InputError

from .bundle import TensorSpec
from .policy import Budget


def _expect(spec: TensorSpec):
    """(dtype, ndim, getter of the fixed dimensions, their values, finiteness check or None) for one spec;
    `check_inputs` keeps it on the spec, made once."""
    fixed = [i for i, d in enumerate(spec.shape) if d is not None]
    values = tuple(spec.shape[i] for i in fixed)
    if len(fixed) == 1:
        values = values[0]                      # itemgetter of one index returns the item, not a tuple
    getter = itemgetter(*fixed) if fixed else (lambda shape: ())
    dtype = np.dtype(spec.dtype)
    finite = _all_finite if dtype in (np.float32, np.float64) else _isfinite if dtype.kind == "f" else None
    return dtype, len(spec.shape), getter, values, finite


def check_inputs(specs: Sequence[TensorSpec], arrays: Sequence[object]) -> list[np.ndarray]:
    """Return the arrays, C-contiguous, or raise InputError naming the first input that is wrong."""
    if len(arrays) != len(specs):
        want = ", ".join(s.describe() for s in specs)
        raise InputError(f"expected {len(specs)} input(s) ({want}), got {len(arrays)}")
    checked = []
    for spec, a in zip(specs, arrays):
        # the spec's expectations, kept in its own __dict__ (a frozen dataclass; one dict lookup, where an
        # lru_cache would hash the spec's fields on every call)
        e = spec.__dict__.get("_expect")
        if e is None:
            e = _expect(spec)
            object.__setattr__(spec, "_expect", e)
        dtype, ndim, getter, values, finite = e
        if not (type(a) is np.ndarray and a.dtype == dtype and a.ndim == ndim and getter(a.shape) == values
                and (ndim == 0 or a.shape[0] != 0)):
            _explain(spec, a)                   # raises; an ndarray subclass that is fine falls through
        a = np.ascontiguousarray(a)
        if finite is not None and not finite(a):
            bad = ~np.isfinite(a)
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InputError(f"input {spec.name!r}: expected finite values, got {int(np.isnan(a).sum())} NaN "
                             f"and {int(np.isinf(a).sum())} inf (first at index {first})")
        checked.append(a)
    if len(checked) > 1:    # the inputs share one open batch: without this, ORT fails deep in a node
        batches = {s.name: a.shape[0] for s, a in zip(specs, checked) if s.shape and s.shape[0] is None}
        if len(set(batches.values())) > 1:
            raise InputError("expected one batch size for every input, got "
                             + ", ".join(f"{n!r} {b}" for n, b in batches.items()))
    return checked


def batch1_check(spec: TensorSpec) -> tuple[tuple[int, ...], Callable[[object], bool]] | None:
    """For an engine's one-input batch-1 path (`TvmEngine.batch1`): (the batch-1 shape, a predicate true for
    an array that passes every check of `check_inputs` at that shape), or None where the spec has other
    dimensions than the batch left open (no one shape to stage). The predicate is only an accept: an
    array it turns down goes through `check_inputs`, which says what is wrong, or takes it (a view, an
    ndarray subclass). Each check is a measurable share of a small model's call (FITS at batch 1); one
    comparison of the whole shape replaces the rank, fixed-dimension and batch checks."""
    if not spec.shape or spec.shape[0] not in (None, 1) or any(d is None for d in spec.shape[1:]):
        return None
    shape = (1, *spec.shape[1:])
    dtype = np.dtype(spec.dtype)
    n = math.prod(shape)
    nd = np.ndarray
    if dtype in (np.float32, np.float64) and 64 <= n < 1 << 16:
        w, isfinite = _weights(n, dtype), math.isfinite

        def ok(a: object) -> bool:
            # the dot of `_all_finite`, inline; ravel copies a non-contiguous view (still right)
            return type(a) is nd and a.dtype == dtype and a.shape == shape and isfinite(a.ravel().dot(w))
    elif dtype.kind == "f":
        def ok(a: object) -> bool:
            return type(a) is nd and a.dtype == dtype and a.shape == shape and _isfinite(a)
    else:
        def ok(a: object) -> bool:
            return type(a) is nd and a.dtype == dtype and a.shape == shape
    return shape, ok


def _explain(spec: TensorSpec, a: object) -> None:
    """Raise InputError for the first thing wrong with `a` as input `spec`."""
    if not isinstance(a, np.ndarray):
        raise InputError(f"input {spec.name!r}: expected a numpy.ndarray {spec.describe()}, "
                         f"got {type(a).__name__}; wrap it with np.asarray(..., dtype=np.{spec.dtype})")
    if a.dtype != np.dtype(spec.dtype):
        raise InputError(f"input {spec.name!r}: expected dtype {spec.dtype}, got {a.dtype}; "
                         f"cast with x.astype(np.{spec.dtype})")
    ok = a.ndim == len(spec.shape) and all(d is None or d == s for d, s in zip(spec.shape, a.shape))
    if not ok:
        raise InputError(f"input {spec.name!r}: expected shape {spec.describe().split(' ', 1)[1]}, "
                         f"got {list(a.shape)}")
    if a.ndim and a.shape[0] == 0:
        raise InputError(f"input {spec.name!r}: expected a batch of at least 1, got an empty batch")


@lru_cache(maxsize=8)
def _weights(n: int, dtype: np.dtype) -> np.ndarray:
    # 2^-(ceil(log2 n) + 1) <= 1 / (2n): n terms of at most the type's largest finite value sum to at most
    # half of it, so the dot cannot overflow; a power of two keeps every finite product finite.
    return np.full(n, 2.0 ** -(math.ceil(math.log2(n)) + 1), dtype)


def _all_finite(a: np.ndarray) -> bool:
    # NOTE: one BLAS dot, no temporary: np.isfinite(a).all() makes a bool array and reduces it, slower for
    # FITS's 5040 floats and on 5 MB alike (benchmarks/RESULTS.md, FITS TIR kernel). A NaN or an inf anywhere
    # makes the dot non-finite (inf - inf is NaN). Below 64 Ki elements: x . w with w = 1 / 2n (`_weights`),
    # which cannot overflow (np.errstate, to silence that, costs more than the dot at that size). Above:
    # x . x, no weights as large as the input, under np.errstate (every term >= 0; it overflows from ~1e19
    # in float32), where a non-finite dot is confirmed the slow way. `a` is C-contiguous float32 or float64.
    v = a.ravel()
    n = v.size
    if n < 64:
        return _isfinite(a)
    if n < 1 << 16:
        return math.isfinite(v.dot(_weights(n, v.dtype)))
    with np.errstate(over="ignore", invalid="ignore"):
        return math.isfinite(v.dot(v)) or _isfinite(a)


def _isfinite(a: np.ndarray) -> bool:
    return bool(np.isfinite(a).all())


# --- arguments that depend on this device or on the budget policy (the rest: `edgeflex.args`) -------

def check_threads(name: str, value: Any, cores: int | None = None) -> int:
    """A thread count: a whole number from 1 to the cores this process may use (`cores`; default
    detected). More threads than cores only queue on the same cores: every engine call then waits on
    its slowest thread's time slice."""
    if cores is None:
        cores = usable_cores()
    if not is_int(value) or not 1 <= value <= cores:
        fail(name, value, f"a whole number in 1..{cores} (the cores this process may use)")
    return int(value)


def check_thread_counts(name: str, value: Any) -> tuple[int, ...]:
    """A thread count, or a non-empty sequence of distinct ones (each `check_threads`)."""
    if is_int(value):
        return (check_threads(name, value),)
    if not isinstance(value, (list, tuple)) or not value:
        fail(name, value, "a thread count >= 1 or a non-empty tuple of them, e.g. (2, 1)")
    counts = tuple(check_threads(name, t) for t in value)
    if len(set(counts)) != len(counts):
        fail(name, value, "distinct thread counts", "give each count once")
    return counts


def check_budget(value: Any) -> Any:
    """A `Budget` (its own fields are checked when it is made)."""
    if not isinstance(value, Budget):
        fail("budget", value, "an edgeflex.Budget", "e.g. Budget(latency_ms=5.0)")
    return value
