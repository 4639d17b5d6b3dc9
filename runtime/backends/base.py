"""The backend interface, all of it:

- `Backend.open(bundle, ...)`: once per runtime, before any load (find compiled engines, vet native code,
  set up a shared thread pool).
- `Backend.load(graph, ...) -> Engine`: one graph, loaded up front.
- `Engine.run(arrays) -> outputs`: checks the inputs against the bundle's specs and runs; a backend fills in
  only `_run`.
- `Backend.compose(engines, constants) -> call`, optional: a whole plan (one engine, or a chain of them)
  as one callable, `call(arrays)` returning what `Runtime.run` returns. The default checks the inputs and
  runs each engine in turn on numpy arrays; a backend may do better (TVM: a batch-1 path with no generic
  dispatch, VM tensors handed from engine to engine).

`Runtime.run` and the exporters' validation and timing go through `compose`, so what is measured at export
is what runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..bundle import Bundle, TensorSpec
from ..checks import check_inputs

# A composed plan: the caller's arrays -> one array (a one-output model) or a tuple of them.
PlanCall = Callable[[Sequence[Any]], "np.ndarray | tuple[np.ndarray, ...]"]


class Engine(ABC):
    """One loaded graph on one backend. Loading is up front; `run` is cheap and called many times."""

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]):
        self.inputs, self.outputs = list(inputs), list(outputs)

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self._run(check_inputs(self.inputs, arrays))

    @abstractmethod
    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Run checked arrays (the engine's inputs, then any constant inputs its plan adds)."""


class Backend(ABC):
    name: str
    # False where the thread count is one setting for the whole process (TVM's thread pool, or ONNX
    # Runtime once a shared pool is set): a Runtime then cannot hold engines at several counts.
    per_engine_threads: bool = True

    def open(self, bundle: Bundle, *, device: str, allow_native: bool = False,
             shared_threads: int | None = None) -> None:
        """Called by `Runtime` before any `load`: a backend whose engines are compiled into the bundle (tvm)
        finds and vets them here; `allow_native` is the caller's leave to run native code it did not
        compile itself; `shared_threads=n` asks for every engine of the process on one pool of n workers
        (a backend whose pool is process-wide already ignores it). Default: nothing to do."""
        return None

    @abstractmethod
    def load(self, graph: bytes, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], *,
             threads: int, initializers: dict[str, np.ndarray] | None = None) -> Engine:
        """Load a graph. `initializers` supplies the graph's external tensors (a bundle's shared weights,
        or weights the runtime derived, e.g. a sparsity level's masked copy) from memory."""

    def compose(self, engines: Sequence[Engine], constants: Sequence[np.ndarray] = ()) -> PlanCall:
        """A plan as one callable: the caller's arrays, checked against the first engine's inputs, then
        `constants` (inputs the plan adds, e.g. a DRESS level), through each engine in turn. Default: numpy
        arrays all along."""
        return sequential(engines, constants)

    def measured(self, config: str) -> dict[str, str]:
        """What `edgeflex compile` measured fastest for `config` on this backend and target, where it
        measured (e.g. {"kernel": "sparse"} for a DRESS level on TVM); the planner prefers it to the
        exporter's choice. Default: nothing measured."""
        return {}

    def can_load(self, graph_sha256: str) -> bool:
        """Whether `load` of the graph with this sha256 would find what it needs (a compiled engine, for a
        backend that compiles ahead of time), asked without reading the graph. Default: any graph loads."""
        return True

    def precision_refusal(self, precision: str) -> str | None:
        """Why this backend would not run a config of `precision` with that precision's arithmetic (it would
        emulate it, or cannot run it at all), in a phrase; None where it runs it. Default: fp32 and int8
        (QDQ graphs) run, as ONNX's standard operators; fp16 and bf16 are for the backend to vouch for."""
        return None if precision in ("fp32", "int8") else f"backend {self.name!r} has no {precision} path"

    def versions(self) -> dict[str, str]:
        return {}


def sequential(engines: Sequence[Engine], constants: Sequence[np.ndarray] = ()) -> PlanCall:
    """`Backend.compose`'s default: check, then each engine's `_run` on the previous one's numpy arrays."""
    specs, extra = engines[0].inputs, list(constants)
    runs = [e._run for e in engines]

    def call(arrays: Sequence[Any]) -> np.ndarray | tuple[np.ndarray, ...]:
        values = check_inputs(specs, arrays)
        if extra:
            values += extra
        for run in runs:
            values = run(values)
        return values[0] if len(values) == 1 else tuple(values)

    return call
