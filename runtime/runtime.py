"""`Runtime`: open a verified bundle, load its engine on one backend, check inputs and run.

The board side: numpy and the engine only, no torch.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from edgeflex.devices import check_device

from .backends import get_backend
from .bundle import Bundle, Config, TensorSpec


class Runtime:
    """`Runtime(path, backend="onnxruntime", device="host", threads=None)`.

    `threads` defaults to the cores this process may use; it is always set explicitly on the engine.
    """

    def __init__(self, path: str | os.PathLike | Bundle, backend: str = "onnxruntime", device: str = "host",
                 *, threads: int | None = None, config: str | None = None):
        self.device = check_device(device)
        self.bundle = path if isinstance(path, Bundle) else Bundle.open(path)
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                   else (os.cpu_count() or 1))
        self._backend = get_backend(backend)
        self.backend = backend
        self._config = self.bundle.config(config)
        self._engine = self._backend.load(self.bundle.read(self._config.graph), self.bundle.inputs,
                                          self.bundle.outputs, threads=self.threads)

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
    def config(self) -> str:
        return self._config.name

    def run(self, *arrays: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        """Run one batch. One array back for a one-output model, else a tuple. Raises InputError on bad input."""
        outs = self._engine.run(arrays)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def info(self) -> dict[str, Any]:
        m = self.bundle.manifest
        return {"name": self.bundle.name, "path": str(self.bundle.path), "family": self.bundle.family,
                "backend": self.backend, "device": self.device, "threads": self.threads, "config": self.config,
                "inputs": [s.describe() for s in self.inputs], "outputs": [s.describe() for s in self.outputs],
                "configs": [c.to_json() for c in self.configs], "export": m.get("export", {}),
                "tools": m.get("tools", {}), "engine_versions": self._backend.versions()}

    def __repr__(self) -> str:
        return f"Runtime({self.bundle.name!r}, backend={self.backend!r}, device={self.device!r}, config={self.config!r})"
