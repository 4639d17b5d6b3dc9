"""Numeric validation of an export: run ONNX Runtime and PyTorch on the same inputs and compare.

Error is reported per output as max absolute error and relative error = max |ort - torch| / max |torch|
(the error against the output's scale, so outputs near zero do not blow it up).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgeflex.errors import ExportError


@dataclass
class Validation:
    max_abs_err: float
    max_rel_err: float
    tolerance: float
    n_inputs: int
    worst_input: str
    per_output: dict[str, float] | None = None     # the worst relative error of each output, by name

    def to_json(self) -> dict:
        out = {"max_abs_err": self.max_abs_err, "max_rel_err": self.max_rel_err, "tolerance": self.tolerance,
               "n_inputs": self.n_inputs, "worst_input": self.worst_input,
               "rel_err_definition": "max|onnxruntime - torch| / max|torch| per output"}
        if self.per_output is not None:
            out["per_output_rel_err"] = self.per_output
        return out


def fresh_inputs(example: tuple[torch.Tensor, ...], n: int, seed: int = 0) -> list[tuple[str, tuple]]:
    """The example itself, n random inputs like it, and one at another batch size (dynamic batch): floats
    normal with the example's mean and spread; integers (token ids, indices) uniform over the example's
    own range, so an embedding sees only ids the example shows are valid; booleans at random."""
    g = torch.Generator().manual_seed(seed)
    cases = [("example", example)]
    scale = [float(t.float().std()) or 1.0 for t in example]
    offset = [float(t.float().mean()) for t in example]

    def like(t: torch.Tensor, batch: int, s: float, o: float) -> torch.Tensor:
        shape = (batch, *t.shape[1:])
        if t.dtype == torch.bool:
            return torch.rand(shape, generator=g) < 0.5
        if not (t.dtype.is_floating_point or t.dtype.is_complex):
            lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 0)
            return torch.randint(lo, hi + 1, shape, generator=g, dtype=t.dtype)
        return (torch.randn(shape, generator=g) * s + o).to(t.dtype)

    for i in range(n):
        batch = example[0].shape[0] if i < n - 1 else example[0].shape[0] + 2
        cases.append((f"random#{i} (batch {batch})",
                      tuple(like(t, batch, s, o) for t, s, o in zip(example, scale, offset))))
    return cases


def validate(model: torch.nn.Module, onnx_bytes: bytes, example: tuple[torch.Tensor, ...], *,
             tolerance: float = 1e-4, n_random: int = 4, threads: int = 1,
             output_names: list[str] | None = None) -> Validation:
    """Compare ONNX Runtime with PyTorch on every output, run the way `Runtime.run` runs it (the backend's
    `compose`, input checks included); raise ExportError naming the worst case if over tolerance.
    `output_names` (in the model's output order) name the outputs in the record and the error."""
    from edgeflex.runtime.backends.onnxruntime import OnnxRuntimeBackend, shared_threads

    backend = OnnxRuntimeBackend()
    engine = backend.load(onnx_bytes, example_specs(example), [], threads=shared_threads() or threads)
    return validate_fn(model, backend.compose([engine]), example, tolerance=tolerance, n_random=n_random,
                       output_names=output_names)


def flat_message(e: BaseException, limit: int = 200) -> str:
    """An exception's message on one line: every line of it, whitespace collapsed (ORT and PyTorch put what
    was wrong on the lines after the first), at most `limit` characters."""
    return " ".join(str(e).split())[:limit]


class ModelFailure(ExportError):
    """The model itself raised on an input validation made (not the graph: no capture strategy helps)."""


def example_specs(example: tuple[torch.Tensor, ...], names: list[str] | None = None) -> list:
    """The input specs an example implies: its shapes with the batch left open, its dtypes."""
    from edgeflex.runtime.bundle import TensorSpec

    names = names or (["x"] if len(example) == 1 else [f"x{i}" for i in range(len(example))])
    return [TensorSpec(n, (None, *t.shape[1:]), str(t.numpy().dtype)) for n, t in zip(names, example)]


def validate_fn(model: torch.nn.Module, run_onnx, example: tuple[torch.Tensor, ...], *,
                tolerance: float = 1e-4, n_random: int = 4, label: str = "",
                output_names: list[str] | None = None) -> Validation:
    """Like `validate`, for any ONNX execution: `run_onnx(list of arrays)` -> an array or a sequence of them
    (a composed plan, `Backend.compose`). `label` names what is checked (e.g. a config) in the error."""
    worst = (0.0, 0.0, "")
    per_output: dict[str, float] = {}
    cases = fresh_inputs(example, n_random)
    for case, inputs in cases:
        try:
            with torch.no_grad():
                ref = model(*inputs)
        except Exception as e:  # noqa: BLE001 - the model's own error, as one line
            hint = "" if case == "example" else (
                "; a bundle's batch dimension is dynamic, so the model must run at any batch (e.g. "
                "x.reshape(x.size(0), -1), not x.reshape(1, -1))")
            raise ModelFailure(f"{type(model).__name__} itself fails in PyTorch on {case}: "
                               f"{type(e).__name__}: {flat_message(e)}{hint}; nothing was "
                               "written") from None
        refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        try:
            outs = run_onnx([t.numpy() for t in inputs])
        except Exception as e:  # noqa: BLE001 - the engine's own error, as one line
            # ORT puts what was wrong on the lines after the first ("index: 0 Got: 3 Expected: 1")
            first = flat_message(e, 300)
            raise ExportError(f"exported graph{' of ' + label if label else ''} does not run on {case}: "
                              f"{type(e).__name__}: {first}; nothing was written") from None
        outs = [outs] if isinstance(outs, np.ndarray) else list(outs)
        if len(outs) != len(refs):
            raise ExportError(f"exported graph has {len(outs)} outputs, PyTorch gave {len(refs)}")
        names = output_names if output_names and len(output_names) == len(refs) else \
            [f"output {i}" for i in range(len(refs))]
        for name, r, o in zip(names, refs, outs):
            r = r.detach().numpy()
            if r.shape != o.shape:
                raise ExportError(f"exported graph output {name} has shape {o.shape}, PyTorch {r.shape} "
                                  f"on {case}")
            abs_err = float(np.max(np.abs(o.astype(np.float64) - r))) if r.size else 0.0
            rel_err = abs_err / max(float(np.max(np.abs(r))) if r.size else 0.0, 1e-30)
            if not np.isfinite(abs_err):
                rel_err = abs_err = float("inf")
            per_output[name] = max(per_output.get(name, 0.0), rel_err)
            if rel_err >= worst[1]:
                where = case if len(refs) == 1 else f"{case}, {name}"
                worst = (abs_err, rel_err, where)
    result = Validation(worst[0], worst[1], tolerance, len(cases), worst[2],
                        per_output if output_names else None)
    if not result.max_rel_err <= tolerance:
        raise ExportError(
            f"export{' of ' + label if label else ''} does not match PyTorch: relative error "
            f"{result.max_rel_err:.3g} on {result.worst_input} "
            f"exceeds the tolerance {tolerance:.3g} by {result.max_rel_err / tolerance:.1f}x; "
            "nothing was written (raise tolerance= only if that error is acceptable)")
    return result
