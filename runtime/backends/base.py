"""The backend interface: `Backend.load(graph) -> Engine`, `Engine.run(arrays) -> outputs`.

`Engine.run` checks inputs once against the bundle's specs; a backend fills in only `_run`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..bundle import Bundle, TensorSpec
from ..checks import check_inputs


class Engine(ABC):
    """One loaded graph on one backend. Loading is up front; `run` is cheap and called many times."""

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]):
        self.inputs, self.outputs = list(inputs), list(outputs)

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self._run(check_inputs(self.inputs, arrays))

    @abstractmethod
    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]: ...

    def _run_chained(self, values: list, first: bool, last: bool, one: bool = False) -> list:
        """One engine of a chained config: `values` are the checked inputs (`first`) or what the previous
        engine returned; returns what the next engine takes, numpy arrays when `last`; `one`: the run's
        batch is 1 (told once by the caller, not asked of every engine's tensors). Default: numpy arrays all
        along; a backend may hand its own tensors from engine to engine instead."""
        return self._run(values)

    def fast_path(self, last: bool = True) -> Callable[[object], Any] | None:
        """A cheaper call for the commonest case, where the backend has one: a function of one caller array
        that returns the run's result as `Runtime.run` does (an array, for the one output), or None when it
        does not take that array as it is (the runtime then checks it the usual way, and raises or runs
        it); it checks exactly what `check_inputs` checks. `last=False`: for the first engine of a chain,
        returning what `_run_chained` hands the next engine. Asked once per plan that takes the caller's
        one input only. Default: none."""
        return None

    def chain_step(self, last: bool) -> Callable[[list], list]:
        """This engine as a later step of a chain's batch-1 fast path: values from the engine before ->
        what the next takes (numpy arrays when `last`). Default: `_run_chained`."""
        return lambda values: self._run_chained(values, False, last, True)


class Backend(ABC):
    name: str
    # False where the thread count is one setting for the whole process (TVM's thread pool): a Runtime
    # then cannot hold engines at several counts.
    per_engine_threads: bool = True

    @abstractmethod
    def load(self, graph: bytes, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], *,
             threads: int, initializers: dict[str, np.ndarray] | None = None) -> Engine:
        """Load a graph. `initializers` supplies the graph's external tensors (a bundle's shared weights,
        or weights the runtime derived, e.g. a sparsity level's masked copy) from memory."""

        ...

    def open(self, bundle: Bundle, *, device: str, allow_native: bool = False) -> None:
        """Called by `Runtime` before any `load`: a backend whose engines are compiled into the bundle (tvm)
        finds and vets them here; `allow_native` is the caller's leave to run native code it did not
        compile itself. Default: nothing to do (the graph is all the engine needs)."""
        return None

    def share_threads(self, threads: int) -> None:
        """Run every engine of this process on one pool of `threads` workers (`Runtime(shared_threads=
        True)`). Default: nothing to do, for a backend whose pool is process-wide already (TVM)."""
        return None

    def shares_threads(self) -> bool:
        """Whether this process already runs every engine of this backend on one shared pool."""
        return False

    def kernel_choice(self, config: str) -> str | None:
        """The DRESS kernel ("dense" / "sparse") this backend measured fastest for `config` on this device,
        where it measured one (TVM, at compile); None: the exporter's choice stands."""
        return None

    def can_load(self, graph_sha256: str) -> bool:
        """Whether `load` of the graph with this sha256 would find what it needs (a compiled engine, for a
        backend that compiles ahead of time), asked without reading the graph. Default: any graph loads."""
        return True

    def versions(self) -> dict[str, str]:
        return {}
