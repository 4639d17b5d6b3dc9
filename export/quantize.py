"""`ef.quantize` / `edgeflex quantize`: reduced-precision variants of every fp32 config, in the same bundle.

For each fp32 config, its plan's graphs (`runtime.plan.build_plans`: the fused graph where there is one, a
DRESS level's masked dense graph) with their weights put in, then:
- int8: QDQ graphs from ONNX Runtime's `quantize_static` (per-channel symmetric int8 weights, uint8
  activations calibrated on the user's data), once per calibration method (min-max, percentile, entropy);
  the method whose outputs are closest to the fp32 config's on the held-out part of the data is kept.
- fp16: every float tensor and operation in half precision, the bundle's fp32 inputs and outputs cast at the
  edges.
Each variant is a config `<base>@<precision>` (`Config.precision`) chaining one segment per graph, its
weights moved into `weights/<precision>.bin`, content-addressed (a tensor several variants share, e.g. an
SN-Net anchor's int8 weights, is stored once). Its outputs against the fp32 config's and its quality on the
held-out data are measured and stored; a variant whose quality drops by more than `max_drop` is refused with
the numbers, and a precision the device lacks is refused in one line (`devices.precision`).
Not the runtime side: running the variants is the backends' (the runtime imports no onnx).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeflex.devices.precision import check_precision, u8s8_saturates
from edgeflex.errors import DataError, ExportError, UsageError
from edgeflex.runtime.bundle import Bundle, Config, TensorSpec, model_id, update_bundle
from edgeflex.runtime.plan import Plan, build_plans

log = logging.getLogger(__name__)

QUANT_PRECISIONS = ("int8", "fp16", "bf16")
METHODS = ("minmax", "percentile", "entropy")
# The default quality threshold per metric: top-1 in points (0.01 = 1 point), error metrics relative (0.02).
DEFAULT_MAX_DROP = {"top1": 0.01, "mse": 0.02}
ALIGN = 64
MIN_EXTERNAL_BYTES = 1024           # smaller tensors (scales, zero points, shapes) stay in their graph
HELD_OUT_SHARE = 0.25
# Operations an fp16 variant runs in fp32 between casts: means over many elements, which lose digits when
# accumulated in half precision (and which TVM 0.27 legalises to an fp32 result for an fp16 input), and
# LayerNormalization, whose mean / inv-std outputs are fp32 whatever its input (stash_type).
FP32_ACCUMULATE = ("ReduceMean", "GlobalAveragePool", "LayerNormalization")


@dataclass
class Variant:
    """One reduced-precision variant of one config: added, or refused with `why` (one line)."""

    base: str
    precision: str
    name: str
    added: bool
    why: str = ""
    method: str | None = None
    drop: float | None = None
    metric: str | None = None
    vs_fp32: dict[str, float] = field(default_factory=dict)
    bytes: int = 0


@dataclass
class Report:
    """What `quantize` did: every variant, added or refused, and the bundle written (None: nothing added)."""

    variants: list[Variant]
    bundle: Bundle | None

    @property
    def refused(self) -> list[Variant]:
        return [v for v in self.variants if not v.added]


# --- calibration data ----------------------------------------------------------------------------------

def load_calibration(data: Any, inputs: Sequence[TensorSpec]) -> tuple[list[np.ndarray], np.ndarray | None]:
    """(input arrays, labels or targets or None) from an .npz path or a mapping: one array per bundle input,
    under its name (or `x` for a one-input bundle), and optionally `y`. One-line DataError on anything
    else."""
    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if not p.is_file():
            raise DataError(f"calibration data {str(p)!r} is not a file; expected an .npz with "
                            f"{_keys(inputs)} (and optionally y)")
        try:
            with np.load(p, allow_pickle=False) as z:       # never unpickle a user's file
                data = {k: z[k] for k in z.files}
        except (ValueError, OSError) as e:
            raise DataError(f"calibration data {str(p)!r} is not a readable .npz of plain arrays ({e})") \
                from None
    if not isinstance(data, Mapping):
        raise DataError(f"calibration data must be an .npz path or a mapping of arrays, got "
                        f"{type(data).__name__}")
    xs = []
    for spec in inputs:
        key = spec.name if spec.name in data else ("x" if len(inputs) == 1 and "x" in data else None)
        if key is None:
            raise DataError(f"calibration data has no array {spec.name!r} (keys: "
                            f"{', '.join(data) or 'none'}); expected {_keys(inputs)} (and optionally y)")
        a = np.asarray(data[key])
        if a.dtype != np.dtype(spec.dtype) and a.dtype.kind == "f" and np.dtype(spec.dtype).kind == "f":
            a = a.astype(spec.dtype)
        if a.dtype != np.dtype(spec.dtype) or a.ndim != len(spec.shape) or any(
                d is not None and d != n for d, n in zip(spec.shape, a.shape)):
            raise DataError(f"calibration array {key!r} is {a.dtype} {list(a.shape)}, expected "
                            f"{spec.describe()}")
        if a.shape[0] < 8 or (xs and a.shape[0] != xs[0].shape[0]):
            raise DataError(f"calibration array {key!r} has {a.shape[0]} samples; expected at least 8, the "
                            "same number in every array")
        if not np.isfinite(a).all():
            raise DataError(f"calibration array {key!r} has NaN or infinite values")
        xs.append(np.ascontiguousarray(a))
    y = data.get("y")
    if y is not None:
        y = np.asarray(y)
        if y.shape[0] != xs[0].shape[0]:
            raise DataError(f"calibration labels y have {y.shape[0]} rows, the inputs {xs[0].shape[0]}")
    return xs, y


def _keys(inputs: Sequence[TensorSpec]) -> str:
    return ", ".join(s.describe() for s in inputs)


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibration and held-out sample indices (a quarter held out, at least 4)."""
    order = np.random.default_rng(seed).permutation(n)
    held = max(4, int(round(n * HELD_OUT_SHARE)))
    return np.sort(order[held:]), np.sort(order[:held])


# --- graphs: a plan's steps as self-contained models -------------------------------------------------------

def _step_models(bundle: Bundle, plan: Plan) -> list[Any]:
    """Each step's graph with the weights the runtime would hand it put in as initializers."""
    import onnx
    from onnx import numpy_helper

    models = []
    for step in plan.steps:
        m = onnx.load_from_string(bundle.read(step.graph))
        inits = step.initializers or {}
        g = m.graph
        keep = [t for t in g.initializer if t.name not in inits]
        del g.initializer[:]
        g.initializer.extend(keep)
        names = {i.name for i in g.input}
        for name, arr in inits.items():
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
            if name in names:
                g.input.remove(next(i for i in g.input if i.name == name))
        external = [t.name for t in g.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        if external:
            raise ExportError(f"graph {step.graph} has weights the plan does not supply ({external[0]}); the "
                              "bundle is inconsistent, re-export it")
        # one entry for the standard domain (a fused graph may list it as both "" and "ai.onnx", which the
        # quantiser refuses)
        std = [o for o in m.opset_import if o.domain in ("", "ai.onnx")]
        if len(std) > 1:
            version = max(o.version for o in std)
            for o in std:
                m.opset_import.remove(o)
            m.opset_import.append(onnx.helper.make_opsetid("", version))
        models.append(m)
    return models


def _session(model: Any, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run_chain(sessions: list, xs: list[np.ndarray], batch: int = 64) -> tuple[list[list[np.ndarray]], list]:
    """Each step's inputs (to calibrate it) and the chain's outputs, run in batches."""
    step_inputs: list[list[list[np.ndarray]]] = [[] for _ in sessions]
    outs: list[list[np.ndarray]] = []
    for lo in range(0, xs[0].shape[0], batch):
        values = [a[lo:lo + batch] for a in xs]
        for i, s in enumerate(sessions):
            step_inputs[i].append(values)
            names = [x.name for x in s.get_inputs()]
            values = s.run(None, dict(zip(names, values)))
        outs.append(values)
    joined = [[np.concatenate([b[k] for b in si]) for k in range(len(si[0]))] for si in step_inputs]
    return joined, [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


def int8_weight_bits() -> int:
    """The bits `quantize_int8` gives int8 weights on this machine: 7 where ORT's u8s8 kernels saturate
    (`devices.precision.u8s8_saturates`), else 8. Recorded per variant (`weight_bits`): a variant of 8-bit
    weights is not loaded on such a CPU (`Runtime`), where its outputs would be off by more than its record
    says."""
    return 7 if u8s8_saturates() else 8


def quantize_int8(model: Any, inputs: list[np.ndarray], method: str, work: Path) -> Any:
    """`model` as a QDQ graph: per-channel symmetric int8 weights (`int8_weight_bits()` of them), uint8
    activations calibrated on `inputs` (one array per graph input) with `method`."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    names = [i.name for i in model.graph.input]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            n = inputs[0].shape[0]
            self._it = iter([{k: a[i:i + 1] for k, a in zip(names, inputs)} for i in range(n)])

        def get_next(self) -> dict | None:
            return next(self._it, None)

    src, dst = work / f"{method}.in.onnx", work / f"{method}.q.onnx"
    onnx.save(model, str(src))
    calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}[method]
    # NOTE: the quantiser prints its calibration steps and logs advice on the root logger: kept out of the
    # caller's output (what it did is in the variant's record).
    with contextlib.redirect_stdout(io.StringIO()), _quiet_root():
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        # 7-bit weights where ORT's u8s8 kernels saturate (its advice for such CPUs). Measured
                        # on a Zen 1 EPYC (`avx2` only, sixteenth session): with 8-bit weights StarNet's int8
                        # outputs were 18-33 % from PyTorch's and FITS's int8 MSE 12 % off; VNNI machines (and
                        # ARM) keep 8 bits
                        reduce_range=int8_weight_bits() == 7,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=calib,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                                       "CalibPercentile": 99.99},
                        calibration_providers=["CPUExecutionProvider"])
    return onnx.load(str(dst))


@contextlib.contextmanager
def _quiet_root():
    """Root-logger records below ERROR dropped for the duration (the quantiser logs there directly)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def to_fp16(model: Any) -> Any:
    """`model` in half precision: float initializers, constants and casts to float become float16; its
    float inputs are cast to float16 on entry and its float outputs back to float32 on exit, so the bundle's
    inputs and outputs keep their specs; the `FP32_ACCUMULATE` operations run in fp32 between casts (all
    their float inputs and outputs)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
            if n.op_type == "Constant" and a.name in ("value_float", "value_floats"):
                arr = np.asarray(a.f if a.name == "value_float" else list(a.floats), np.float16)
                n.attribute.remove(a)
                n.attribute.append(helper.make_attribute("value", numpy_helper.from_array(arr)))
                break
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16),
                                                     a.t.name))
    def rename(name: str) -> str:         # every node reading or writing `name` now uses its fp16 twin
        inner = f"{name}.fp16"
        for n in g.node:
            for field_ in (n.input, n.output):
                for k, x in enumerate(field_):
                    if x == name:
                        field_[k] = inner
        return inner

    floats = [v.name for v in g.input if v.type.tensor_type.elem_type == TensorProto.FLOAT]
    outs = [v.name for v in g.output if v.type.tensor_type.elem_type == TensorProto.FLOAT]
    head = [helper.make_node("Cast", [x], [rename(x)], to=TensorProto.FLOAT16) for x in floats]
    tail = [helper.make_node("Cast", [rename(y)], [y], to=TensorProto.FLOAT) for y in outs]
    body = []
    for k, n in enumerate(g.node):          # averages accumulate in fp32 (also what TVM's legalisation needs)
        if n.op_type not in FP32_ACCUMULATE:
            body.append(n)
            continue
        for i, x in enumerate(n.input):
            if x and (n.op_type != "ReduceMean" or i == 0):        # ReduceMean's axes input is int64
                body.append(helper.make_node("Cast", [x], [f"{x}.fp32.{k}"], to=TensorProto.FLOAT))
                n.input[i] = f"{x}.fp32.{k}"
        back = []
        for i, y in enumerate(n.output):
            if y:
                n.output[i] = f"{y}.fp32"
                back.append(helper.make_node("Cast", [f"{y}.fp32"], [y], to=TensorProto.FLOAT16))
        body += [n, *back]
    nodes = [*head, *body, *tail]
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]                     # float32 annotations of intermediate tensors: no longer true
    return m


# --- storing: content-addressed weights per precision ---------------------------------------------------

class PrecisionStore:
    """The tensors of one precision's variants in one aligned file `weights/<precision>.bin`; a tensor's
    id is its content's hash, so identical tensors (the same weight quantised the same way) are stored
    once."""

    def __init__(self, precision: str):
        self.file = f"weights/{precision}.bin"
        self.precision = precision
        self.blob = bytearray()
        self.index: dict[str, dict[str, Any]] = {}

    def add(self, arr: np.ndarray) -> str:
        arr = np.ascontiguousarray(arr)
        h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode() + arr.tobytes()).hexdigest()
        tid = f"{self.precision}-{h[:24]}"
        if tid not in self.index:
            self.blob.extend(b"\0" * (-len(self.blob) % ALIGN))
            self.index[tid] = {"file": self.file, "offset": len(self.blob), "bytes": arr.nbytes,
                               "dtype": arr.dtype.str, "shape": list(arr.shape)}
            self.blob.extend(arr.tobytes())
        return tid

    def externalize(self, model: Any) -> tuple[bytes, dict[str, str], int]:
        """The graph with its large initializers moved here (marked external; the runtime hands them over),
        the initializer -> tensor id map, and the bytes of all its weights."""
        import onnx
        from onnx import numpy_helper

        m = onnx.ModelProto()
        m.CopyFrom(model)
        refs, total = {}, 0
        for t in m.graph.initializer:
            arr = numpy_helper.to_array(t)
            total += arr.nbytes
            if arr.nbytes < MIN_EXTERNAL_BYTES:
                continue
            tid = refs[t.name] = self.add(arr)
            meta = self.index[tid]
            for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(f)
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            for k, v in (("location", self.file), ("offset", str(meta["offset"])),
                         ("length", str(meta["bytes"]))):
                e = t.external_data.add()
                e.key, e.value = k, v
        return m.SerializeToString(), refs, total


# --- quality ---------------------------------------------------------------------------------------------

def _metric(bundle: Bundle, base: Config, y: np.ndarray | None, out: np.ndarray) -> str:
    """"top1", "mse" or "mae": the base config's metric (a "top1 on <data>" is top-1), else its family's."""
    if base.quality and base.quality.get("metric"):
        m = base.quality["metric"]
        return "top1" if m.startswith("top1") else m
    try:
        from edgeflex.models.registry import get_family

        ev = get_family(bundle.family).evaluation
        if ev is not None:
            return ev.metric
    except Exception:  # noqa: BLE001 - an unregistered family: decide from the outputs
        pass
    return "top1" if out.ndim == 2 and (y is None or y.dtype.kind in "iu") else "mse"


def _score(metric: str, out: np.ndarray, y: np.ndarray) -> float:
    if metric == "top1":
        return float((out.argmax(1) == y).mean())
    err = out[:, -y.shape[1]:] - y if out.ndim == y.ndim and out.shape != y.shape else out - y
    return float(np.abs(err).mean()) if metric == "mae" else float((err ** 2).mean())


def _drop(metric: str, ref: float, got: float) -> float:
    """The quality lost: top-1 points as a share (0.01 = 1 point), an error metric's relative rise."""
    if metric == "top1":
        return ref - got
    return (got - ref) / max(ref, 1e-12)


def _compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    diff = np.abs(got.astype(np.float64) - ref)
    scale = max(float(np.abs(ref).max()), 1e-30)
    out = {"max_abs_err": float(diff.max()), "max_rel_err": float(diff.max() / scale),
           "mean_rel_err": float(diff.mean() / scale)}
    if ref.ndim == 2 and ref.shape[1] > 1:
        out["argmax_agreement"] = float((ref.argmax(1) == got.argmax(1)).mean())
    return out


def _drop_text(metric: str, drop: float) -> str:
    return f"{drop * 100:.2f} points" if metric == "top1" else f"{drop * 100:.2f} %"


# --- the whole job ----------------------------------------------------------------------------------------

def quantize(path: str | os.PathLike, calibration: Any, *, precisions: Sequence[str] = ("int8",),
             max_drop: float | None = None, device: str = "host", methods: Sequence[str] = METHODS,
             threads: int = 1, seed: int = 0, progress: bool = True) -> Report:
    """Add each fp32 config's variants in `precisions` to the bundle at `path`, calibrated on `calibration`
    (an .npz path or a mapping: the inputs under their names or `x`, optionally labels/targets `y`).

    A quarter of the samples is held out: the int8 calibration method is chosen by its outputs' error
    against fp32 there, and every variant's quality is measured there (against `y` when given, else
    against the fp32 config's own predictions). `max_drop`: the quality loss refused, in top-1 points
    (1.0 = one point) or percent of an error metric (2.0 = 2 %); default 1 point / 2 %. A precision
    `device` has no arithmetic for is refused before anything runs. Returns the report; raises ExportError
    when no variant was added."""
    from edgeflex.devices import check_device
    from edgeflex.runtime.progress import bar

    if isinstance(precisions, str):
        precisions = [p for p in precisions.split(",") if p]
    precisions = list(dict.fromkeys(precisions))
    for p in precisions:
        if p not in QUANT_PRECISIONS:
            raise UsageError(f"unknown precision {p!r}; expected some of: {', '.join(QUANT_PRECISIONS)}")
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"unknown calibration method {m!r}; expected some of: {', '.join(METHODS)}")
    if max_drop is not None and (isinstance(max_drop, bool) or not isinstance(max_drop, (int, float))
                                 or not max_drop >= 0):
        raise UsageError(f"max_drop must be a number >= 0 (top-1 points or percent), got {max_drop!r}")
    check_device(device)
    for p in precisions:
        check_precision(device, p, f"quantize to {p}")
        if p == "bf16":
            raise UsageError("bf16: no edgeflex backend runs a bf16 graph here (ONNX Runtime's CPU provider "
                             "has no bf16 kernels; the TVM bf16 path is not built), so it is refused rather "
                             "than emulated; use fp16 or int8")
    with Bundle.open(path) as b:
        made = model_id(b.manifest)
        xs, y = load_calibration(calibration, b.inputs)
        have = {c.precision for c in b.configs}
        for p in precisions:
            if p in have:
                raise UsageError(f"bundle {b.name!r} has {p} configs already; quantize a fresh export to "
                                 "make them again")
        cal, held = _split(xs[0].shape[0], seed)
        bases = [c for c in b.configs if c.precision == "fp32"]
        plans = build_plans(b, fused=True)
        for c in bases:
            if plans[c.name].constants:         # a level as an input (DRESS sparse): its dense graph instead
                plans.update(build_plans(b, fused=True, only={c.name}, kernel=lambda _n: "dense"))
        variants, stores = [], {p: PrecisionStore(p) for p in precisions}
        files: dict[str, bytes] = {}
        new_configs, new_segments = [], {}
        pb = bar(len(bases) * len(precisions), "quantize", show=progress, unit="variant")
        with tempfile.TemporaryDirectory(prefix="edgeflex-quantize-") as tmp:
            for c in bases:
                plan = plans[c.name]
                if plan.constants:
                    variants += [Variant(c.name, p, f"{c.name}@{p}", False, "its plan takes constant inputs "
                                         "no quantised graph can hold") for p in precisions]
                    pb.update(len(precisions))
                    continue
                fp32 = _step_models(b, plan)
                sessions = [_session(m, threads) for m in fp32]
                step_in, ref = _run_chain(sessions, xs)
                metric = _metric(b, c, y, ref[0])
                limit = (DEFAULT_MAX_DROP.get(metric, 0.02) if max_drop is None else max_drop / 100)
                for p in precisions:
                    v = _variant(b, c, plan, fp32, step_in, ref, xs, y, cal, held, p, metric, limit, methods,
                                 threads, Path(tmp), stores[p], files, new_configs, new_segments)
                    variants.append(v)
                    pb.update(1)
        pb.close()
        added = [v for v in variants if v.added]
        for v in variants:
            if not v.added:
                log.warning("refused %s: %s", v.name, v.why)
        if not added:
            raise ExportError("no variant added: " + "; ".join(f"{v.name}: {v.why}" for v in variants))
        index = {}
        for s in stores.values():
            if s.index:
                files[s.file] = bytes(s.blob)
                index.update(s.index)

        def edit(m: dict[str, Any]) -> dict[str, Any]:
            return {**m, "configs": [*m["configs"], *new_configs],
                    "segments": {**m.get("segments", {}), **new_segments},
                    "tensors": {**m.get("tensors", {}), **index}}

    out = update_bundle(path, files, model=made, edit=edit)
    return Report(variants, out)


def _variant(b: Bundle, c: Config, plan: Plan, fp32: list, step_in: list, ref: list, xs: list, y: Any,
             cal: np.ndarray, held: np.ndarray, precision: str, metric: str, limit: float,
             methods: Sequence[str], threads: int, tmp: Path, store: PrecisionStore, files: dict,
             new_configs: list, new_segments: dict) -> Variant:
    """Make, measure and (if within `limit`) stage one variant; a refused one says why in one line."""
    name = f"{c.name}@{precision}"
    held_x = [a[held] for a in xs]
    ref_held = [r[held] for r in ref]
    tried: dict[str, float] = {}
    last_error = ""
    best: tuple[float, str, list, list] | None = None
    for method in (methods if precision == "int8" else ("cast",)):
        try:
            if precision == "int8":
                models = []
                for i, (m, si) in enumerate(zip(fp32, step_in)):
                    work = tmp / f"{c.name}.{method}.{i}"
                    work.mkdir(parents=True, exist_ok=True)
                    models.append(quantize_int8(m, [a[cal] for a in si], method, work))
            else:
                models = [to_fp16(m) for m in fp32]
            _, outs = _run_chain([_session(m, threads) for m in models], held_x)
        except Exception as e:  # noqa: BLE001 - the quantiser's or ORT's own errors: one line, next method
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            tried[method] = float("nan")
            log.info("%s with %s failed: %s", name, method, msg)
            last_error = msg
            continue
        err = float(np.mean([np.mean((o.astype(np.float64) - r) ** 2)
                             / max(np.mean(r.astype(np.float64) ** 2), 1e-30)
                             for o, r in zip(outs, ref_held)]))
        tried[method] = err
        if best is None or err < best[0]:
            best = (err, method, models, outs)
    if best is None:
        return Variant(c.name, precision, name, False, f"could not be made ({last_error})")
    _, method, models, outs = best
    vs = _compare(ref_held[0], outs[0])
    if y is not None:
        ref_q, got_q = _score(metric, ref_held[0], y[held]), _score(metric, outs[0], y[held])
        against, drop = "labels", _drop(metric, ref_q, got_q)
    elif metric == "top1":                  # no labels: the share of predictions the variant changes
        ref_q, got_q = 1.0, vs.get("argmax_agreement", 1.0)
        against, drop = "the fp32 config's predictions", ref_q - got_q
    else:                                   # no targets: the variant's error relative to the fp32 outputs
        ref_q = float(np.mean(ref_held[0].astype(np.float64) ** 2))
        got_q = float(np.mean((outs[0].astype(np.float64) - ref_held[0]) ** 2))
        against, drop = "the fp32 config's outputs (mean square)", got_q / max(ref_q, 1e-30)
    v = Variant(c.name, precision, name, False, method=method, drop=drop, metric=metric, vs_fp32=vs)
    n = len(held)
    if drop > limit:
        v.why = (f"{metric} drops by {_drop_text(metric, drop)} > the {_drop_text(metric, limit)} allowed "
                 f"(fp32 {ref_q:.4g}, {precision} {got_q:.4g} on {n} held-out samples against {against}; "
                 f"method {method})")
        return v
    seg_names = [name if len(models) == 1 else f"{name}.{i}" for i in range(len(models))]
    total = 0
    for m, seg, step in zip(models, seg_names, plan.steps):
        data, refs, nbytes = store.externalize(m)
        digest = hashlib.sha256(data).hexdigest()[:16]
        rel = f"graphs/{precision}/{digest}.onnx"
        files[rel] = data
        total += nbytes
        new_segments[seg] = {"graph": rel, "tensors": refs,
                             "inputs": [s.to_json() for s in step.inputs],
                             "outputs": [s.to_json() for s in step.outputs]}
    quality = None
    if c.quality and "value" in c.quality:      # the base's figure moved by the drop measured here
        base_v = float(c.quality["value"])
        value = base_v - drop if metric == "top1" else base_v * (1 + drop)
        quality = {**c.quality, "value": value}
    from edgeflex.runtime.backends.onnxruntime import OnnxRuntimeBackend

    ort_note = OnnxRuntimeBackend().precision_refusal(precision)
    record = {"base": c.name, "method": method, "quality_drop": drop,
              **({"weight_bits": int8_weight_bits()} if precision == "int8" else {}),
              "measured_with": "ONNX Runtime CPU" + (f" ({ort_note}: the figures carry fp16 storage "
                                                     "rounding, not fp16 arithmetic)" if ort_note else ""),
              "vs_fp32": {**vs, "held_out_samples": n, "calibration_samples": int(len(cal)),
                          "fp32_quality": ref_q, "variant_quality": got_q, "measured_against": against,
                          "methods_tried": {k: (None if np.isnan(e) else e) for k, e in tried.items()},
                          "method_error": "mean over outputs of mean squared error / mean square of fp32"}}
    cfg = Config(name, None, quality, c.flops, total, tuple(seg_names),
                 {**(c.costs or {}), "precision": precision} if c.costs else None, precision=precision,
                 quantization=record)
    new_configs.append(cfg.to_json())
    v.added, v.bytes = True, total
    return v
