"""Complex-to-real lowering: a model with complex tensors (FFTs, complex weights) -> a real FX GraphModule.

`lower_complex(model, example)` captures the model with `torch.export` (batch dynamic where it can be, every
other size static), decomposes it to core ATen, and rewrites the graph so that no value is complex: each
complex value becomes a (real, imag) pair of real tensors, each op on it real ops, complex parameters and
buffers two real buffers. It owns the rewrite only: ONNX capture and validation stay in `core.py`.

Graph form of the result, for passes that look for patterns in it (e.g. a FITS matcher):
- A DFT of fixed length along an axis is `aten.transpose.int(x, dim, -1)` (only when that axis is not last),
  then `aten.matmul.default(x, W)` with W a `get_attr` buffer named `dft<i>_<kind>_<part>` (kind: `r2c`,
  `c2c`, `c2cinv`, `c2r`; part: `cos` or `sin`, the normalisation folded in, shape (length in, length out)),
  the products combined by `aten.add.Tensor` / `aten.sub.Tensor`, then the transpose back. A forward real
  FFT is two matmuls (re = x @ cos, im = x @ sin, where sin holds -sin(2 pi j k / n)); an inverse real FFT
  is `re @ cos - im @ sin` (cos/sin carry the Hermitian weights 1, 2, ..., 2, 1 and the 1/n); a complex
  FFT four matmuls. Multi-axis FFTs are one such DFT per axis. Then `dft_bins.prune_bins` keeps only the
  bins the graph uses: a DFT whose output is sliced gets W's columns `<name>_cols<s>_<e>`, an inverse DFT
  fed zero bins W's rows `<name>_rows<s>_<e>` (FITS's low-pass and zero padding: rows/cols = cut_freq).
- A complex product (mm, bmm, matmul, mul) is the four real products combined by sub/add.
- Every emitted node carries `meta["complex_lowering"]` (the ATen op it lowers) and the source op's
  `meta["stack_trace"]`; every node `meta["tensor_meta"]` from a run on the example (its batch, not a
  symbol: `torch.export.export(gm, example)` gives symbolic `meta["val"]`).
- Non-tensor outputs (an `(xy, 0)` return) are dropped; the graph returns its tensors, one or a tuple.

An op on complex values without a rule raises ExportError naming the op and the user's source line.
"""

from __future__ import annotations

import inspect
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx

from edgeflex.errors import ExportError

from .dft_bins import prune_bins

aten = torch.ops.aten

REAL_OF = {torch.complex64: torch.float32, torch.complex128: torch.float64, torch.complex32: torch.float16}


@dataclass(frozen=True)
class Pair:
    """A complex value as two real nodes; `im` is None when the imaginary part is known to be zero."""
    re: Any
    im: Any


def lower_complex(model: torch.nn.Module, example: Any) -> fx.GraphModule:
    """`model` as a real GraphModule: same inputs, its tensor outputs (one, or a tuple), no complex value."""
    example = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    gm = _Lowering(capture(model, example)).run(type(model).__name__)
    # shapes propagated at the batch the graph was captured at (a static fallback holds traceable's)
    gm.meta["complex_lowering"]["bin_rewrites"] = prune_bins(gm, traceable(example))
    return gm


class TensorOutputs(torch.nn.Module):
    """`model` returning only its tensor outputs (one, or a tuple), as the lowered graph does."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        outs = [o for o in torch.utils._pytree.tree_leaves(self.model(*args)) if isinstance(o, torch.Tensor)]
        return outs[0] if len(outs) == 1 else tuple(outs)


def uses_complex(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> bool:
    """Whether `model` has a complex parameter or buffer, or makes a complex tensor on `example`."""
    if any(t.is_complex() for t in [*model.parameters(), *model.buffers()]):
        return True
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Seen(TorchDispatchMode):
        found = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            leaves = torch.utils._pytree.tree_leaves(out)
            if any(isinstance(t, torch.Tensor) and t.is_complex() for t in leaves):
                _Seen.found = True
            return out

    with torch.no_grad(), _Seen():
        model(*example)
    return _Seen.found


def traceable(example: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """`example` with a batch of 1 repeated to 2: torch.export specialises a size-1 dimension (its 0/1 rule)
    and the graph of a model whose other sizes are static is the same at any batch."""
    return tuple(t.repeat(2, *[1] * (t.dim() - 1)) if t.dim() and t.shape[0] == 1 else t for t in example)


def capture(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """torch.export with a dynamic batch (static batch if that fails), decomposed to core ATen."""
    model = model.eval()
    example = traceable(example)
    batch = tuple({0: torch.export.Dim("batch")} for _ in example)
    # a forward(*xs) (the exporter's FlatOutputs around a model with several outputs) takes its inputs as one
    # varargs tuple, and torch.export wants the dynamic shapes nested the same way
    params = inspect.signature(model.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        batch = (batch,)
    tries = (batch, None)
    failures = []
    for dyn in tries:
        try:
            ep = torch.export.export(model, example, dynamic_shapes=dyn, strict=False)
            return ep.run_decompositions().module()
        except Exception as e:  # noqa: BLE001 - reported below
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            failures.append(f"{'dynamic' if dyn else 'static'} batch: {type(e).__name__}: {first}")
    raise ExportError(f"complex lowering: torch.export could not capture {type(model).__name__}; tried "
                      + " | ".join(failures))


# --- DFT matrices ---------------------------------------------------------------------------------------

def _scale(norm: int, n: int) -> float:
    # aten's normalization: 0 none, 1 by 1/sqrt(n), 2 by 1/n (n: the signal length along this axis)
    return {0: 1.0, 1: 1.0 / math.sqrt(n), 2: 1.0 / n}[norm]


def _cos_sin(rows: int, cols: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    # the integer phase (j * k mod n) before the float, and exact zeros at multiples of pi / 2: a DC or
    # Nyquist bin's imaginary part must come out 0, not 1e-16 of either sign (angle() tells them apart)
    j, k = np.arange(rows)[:, None], np.arange(cols)[None, :]
    ang = 2 * np.pi * ((j * k) % n) / n
    cos, sin = np.cos(ang), np.sin(ang)
    cos[np.abs(cos) < 1e-12] = 0.0
    sin[np.abs(sin) < 1e-12] = 0.0
    return cos + 0.0, sin + 0.0


def dft_matrices(kind: str, n_in: int, n_out: int, n: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) float64 matrices, shape (n_in, n_out), of one DFT axis of signal length `n`, in the graph
    form of the module docstring. r2c: n samples -> n_out bins; c2c / c2cinv: n -> n; c2r: n_in bins -> n
    samples (Hermitian weights; bins past n // 2 and the DC and Nyquist imaginary parts count for nothing,
    as in pocketfft)."""
    if kind != "c2r":
        cos, sin = _cos_sin(n_in, n_out, n)
        if kind in ("r2c", "c2c"):                           # forward: exp(-i theta)
            sin = 0.0 - sin
        return scale * cos, scale * sin
    used = min(n_in, n // 2 + 1)
    cos, sin = _cos_sin(used, n, n)
    w = np.full((used, 1), 2.0)
    w[0] = 1.0
    nyquist = n % 2 == 0 and used == n // 2 + 1
    if nyquist:
        w[n // 2] = 1.0
    cos, sin = w * cos, w * sin
    pad = np.zeros((n_in - used, n))
    return scale * np.vstack([cos, pad]), scale * np.vstack([sin, pad])


# --- the rewrite ----------------------------------------------------------------------------------------

_TRACE = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def source_line(node: fx.Node) -> str:
    """'file.py:12 (`code`)' of the user's line that made `node`, from its stack trace, or ''."""
    found = _TRACE.findall(node.meta.get("stack_trace") or "")
    if not found:
        return ""
    path, line, _, code = found[-1]
    return f"{path}:{line} (`{code.strip()}`)"


class _Lowering:
    def __init__(self, gm: fx.GraphModule):
        self.src = gm
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.consts: dict[str, torch.Tensor] = {}
        self.node: fx.Node | None = None
        self.n_dft = 0
        self.dft_cache: dict[tuple, fx.Node] = {}

    # emission helpers
    def op(self, target, *args, **kwargs) -> fx.Node:
        n = self.graph.call_function(target, args, kwargs)
        if self.node is not None:
            n.meta["complex_lowering"] = str(self.node.target)
            if self.node.meta.get("stack_trace"):
                n.meta["stack_trace"] = self.node.meta["stack_trace"]
        return n

    def const(self, name: str, t: torch.Tensor) -> fx.Node:
        base = re.sub(r"\W", "_", name)
        name, i = base, 1
        while name in self.consts:
            name, i = f"{base}_{i}", i + 1
        self.consts[name] = t.detach().clone().contiguous()
        return self.graph.get_attr(name)

    def fail(self, what: str) -> ExportError:
        n = self.node
        where = source_line(n) if n is not None else ""
        return ExportError(f"complex lowering: no rule for {what} on a complex tensor"
                           f"{' at ' + where if where else ''}; write that step with real tensors "
                           "(torch.view_as_real) or leave it out of the exported model")

    def run(self, name: str) -> fx.GraphModule:
        outputs: list = []
        dropped = 0
        for node in self.src.graph.nodes:
            self.node = node
            if node.op == "placeholder":
                if _is_complex(node):
                    raise ExportError(f"complex lowering: input {node.name!r} of {name} is complex; pass "
                                      "torch.view_as_real(x) and call torch.view_as_complex inside the model")
                self.env[node] = self.graph.placeholder(node.name)
            elif node.op == "get_attr":
                t = operator.attrgetter(node.target)(self.src)
                if isinstance(t, torch.Tensor) and t.is_complex():
                    self.env[node] = Pair(self.const(node.target + "_re", t.real),
                                          self.const(node.target + "_im", t.imag))
                elif isinstance(t, torch.Tensor):
                    self.env[node] = self.const(node.target, t)
                else:
                    raise ExportError(f"complex lowering: {name} holds a {type(t).__name__} at "
                                      f"{node.target!r}; expected tensors only")
            elif node.op == "call_module":
                if not node.target.startswith("_guards"):
                    raise ExportError(f"complex lowering: unexpected submodule call {node.target!r}")
            elif node.op == "call_function":
                self.env[node] = self.call(node)
            elif node.op == "output":
                outputs = torch.utils._pytree.tree_leaves(node.args[0])
        self.node = None
        outs = []
        for o in outputs:
            v = self.env[o] if isinstance(o, fx.Node) else o
            if isinstance(v, Pair):
                raise ExportError(f"complex lowering: {name} returns a complex tensor ({o.name}); return "
                                  "torch.view_as_real(y), or y.real / y.abs()")
            if isinstance(v, fx.Node):
                outs.append(v)
            else:
                dropped += 1
        if not outs:
            raise ExportError(f"complex lowering: {name} returns no tensor")
        self.graph.output(outs[0] if len(outs) == 1 else tuple(outs))
        root = torch.nn.Module()
        for k, t in self.consts.items():
            root.register_buffer(k, t)
        self.graph.eliminate_dead_code()
        gm = fx.GraphModule(root, self.graph, class_name=f"{name}Lowered")
        gm.graph.lint()
        lowered = sorted({n.meta["complex_lowering"] for n in gm.graph.nodes if "complex_lowering" in n.meta})
        gm.meta["complex_lowering"] = {"lowered_ops": lowered, "dft_matrix_pairs": self.n_dft,
                                       "dropped_non_tensor_outputs": dropped}
        return gm

    def call(self, node: fx.Node):
        involved = _is_complex(node) or any(isinstance(self.env.get(a), Pair) for a in node.all_input_nodes)
        if node.target is operator.getitem and isinstance(self.env[node.args[0]], Pair):
            src = self.env[node.args[0]]
            return Pair(self.op(operator.getitem, src.re, node.args[1]),
                        None if src.im is None else self.op(operator.getitem, src.im, node.args[1]))
        if node.target is aten.slice_scatter.default and _static_scatter(node):
            return _scatter_as_cat(self, node, involved)
        if node.target is aten.repeat.default and not involved and _repeat_is_expand(node):
            # NOTE: torch.onnx writes a repeat by the dynamic batch as Tile of a shape expression, which
            # TVM's Relax importer refuses (FNO's grid); repeating size-1 axes is an expand
            x, times = self.env[node.args[0]], node.args[1]
            return self.op(aten.expand.default, x, [-1 if isinstance(r, int) and r == 1 else self.arg(r)
                                                    for r in times])
        if node.target is aten.bmm.default and not involved:
            return _matmul(self, node).re                   # a real Linear: as matmul(x, W) too
        if not involved:
            return self.graph.node_copy(node, lambda a: self.env[a])
        if node.target in _DROP:
            return None
        rule = RULES.get(node.target) or RULES.get(getattr(node.target, "overloadpacket", None))
        if rule is None:
            raise self.fail(str(node.target))
        return rule(self, node)

    # argument access
    def arg(self, a):
        """The lowered value of a source argument (nested lists kept)."""
        return fx.node.map_arg(a, lambda n: self.env[n])

    def pair(self, v) -> Pair:
        if isinstance(v, Pair):
            return v
        if isinstance(v, complex):
            return Pair(v.real, v.imag or None)
        return Pair(v, None)

    def im_or_zeros(self, p: Pair):
        return p.im if p.im is not None else self.op(aten.zeros_like.default, p.re)

    def parts(self, node: fx.Node) -> tuple[tuple, dict, tuple, dict]:
        """(re args, re kwargs, im args, im kwargs) of `node` with each complex argument split and each
        floating real argument taken as (x, 0); integer/bool tensors (indices, masks) are shared."""
        def split(part: int):
            def one(a):
                if isinstance(a, fx.Node):
                    v = self.env[a]
                    if isinstance(v, Pair):
                        return v.re if part == 0 else self.im_or_zeros(v)
                    if part == 1 and _is_floating(a):
                        return self.op(aten.zeros_like.default, v)
                    return v
                if isinstance(a, (list, tuple)):
                    return type(a)(one(x) for x in a)
                if isinstance(a, torch.dtype):
                    return REAL_OF.get(a, a)
                if isinstance(a, complex):
                    return a.real if part == 0 else a.imag
                return a
            return one
        re_, im_ = split(0), split(1)
        return (tuple(re_(a) for a in node.args), {k: re_(v) for k, v in node.kwargs.items()},
                tuple(im_(a) for a in node.args), {k: im_(v) for k, v in node.kwargs.items()})

    # products
    def bilinear(self, target, a: Pair, b: Pair, *extra) -> Pair:
        def f(x, y):
            if x is None or y is None:
                return None
            return self.op(target, x, y, *extra)
        return Pair(self.combine(f(a.re, b.re), f(a.im, b.im), aten.sub.Tensor),
                    self.combine(f(a.re, b.im), f(a.im, b.re), aten.add.Tensor))

    def combine(self, x, y, target):
        if y is None:
            return x
        if x is None:
            return y if target is aten.add.Tensor else self.op(aten.neg.default, y)
        return self.op(target, x, y)

    def along_last(self, v: Pair, dim: int, ndim: int, fn: Callable[[Pair], Pair]) -> Pair:
        """Apply `fn` to `v` with axis `dim` moved last (transpose there and back)."""
        if dim == ndim - 1:
            return fn(v)
        def t(x):
            return None if x is None else self.op(aten.transpose.int, x, dim, ndim - 1)
        out = fn(Pair(t(v.re), t(v.im)))
        return Pair(t(out.re), t(out.im))

    def matrices(self, kind: str, n_in: int, n_out: int, n: int, scale: float) -> tuple[fx.Node, fx.Node]:
        v = _val(self.node.args[0])              # the FFT's input: float32 / complex64, or 64-bit
        dtype = torch.float64 if v.dtype in (torch.float64, torch.complex128) else torch.float32
        key = (kind, n_in, n_out, n, scale, dtype)
        if key not in self.dft_cache:
            cos, sin = dft_matrices(kind, n_in, n_out, n, scale)
            i = self.n_dft
            self.n_dft += 1
            self.dft_cache[key] = (
                self.const(f"dft{i}_{kind}_cos", torch.from_numpy(cos).to(dtype)),
                self.const(f"dft{i}_{kind}_sin", torch.from_numpy(sin).to(dtype)))
        return self.dft_cache[key]

    def dft(self, v: Pair, dim: int, ndim: int, kind: str, n_in: int, n_out: int, n: int,
            scale: float) -> Pair:
        """One DFT axis. kind r2c / c2c (forward) / c2cinv: complex out; c2r: real out (im None)."""
        cos, sin = self.matrices(kind, n_in, n_out, n, scale)

        def fn(x: Pair) -> Pair:
            def mm(a, w):
                return None if a is None else self.op(aten.matmul.default, a, w)
            if kind == "c2r":
                return Pair(self.combine(mm(x.re, cos), mm(x.im, sin), aten.sub.Tensor), None)
            # (a + ib)(cos + i sin) with sin signed per direction in the matrix
            return Pair(self.combine(mm(x.re, cos), mm(x.im, sin), aten.sub.Tensor),
                        self.combine(mm(x.re, sin), mm(x.im, cos), aten.add.Tensor))
        return self.along_last(v, dim, ndim, fn)


def _val(node) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_complex(node) -> bool:
    v = _val(node)
    vals = v if isinstance(v, (list, tuple)) else [v]
    return any(isinstance(t, torch.Tensor) and t.is_complex() for t in vals)


def _is_floating(node) -> bool:
    v = _val(node)
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _shape(node) -> tuple:
    return tuple(_val(node).shape)


def _static(size, what: str, low: _Lowering) -> int:
    try:
        return int(size)
    except Exception as e:  # a symbolic size
        raise low.fail(f"{what} of dynamic length") from e


# --- rules ----------------------------------------------------------------------------------------------

RULES: dict[Any, Callable[[_Lowering, fx.Node], Any]] = {}
_DROP = {aten._assert_tensor_metadata.default}


def rule(*targets):
    def deco(fn):
        for t in targets:
            RULES[t] = fn
        return fn
    return deco


# The same op on the real and imaginary parts: layout, indexing, scatter, linear reductions.
_BOTH = (
    aten.slice.Tensor, aten.select.int, aten.permute.default, aten.view.default, aten._unsafe_view.default,
    aten.reshape.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.expand.default, aten.clone.default, aten.alias.default, aten.transpose.int, aten.t.default,
    aten.cat.default, aten.stack.default, aten.flip.default, aten.roll.default, aten.repeat.default,
    aten.constant_pad_nd.default, aten.slice_scatter.default, aten.select_scatter.default, aten.where.self,
    aten.index_put.default, aten.index.Tensor, aten.index_select.default, aten.split.Tensor,
    aten.split_with_sizes.default, aten.unbind.int, aten.narrow.default, aten.sum.dim_IntList, aten.mean.dim,
    aten.neg.default, aten.lift_fresh_copy.default, aten.detach.default, aten.zeros_like.default,
    aten.empty_like.default, aten.diagonal.default, aten.masked_fill.Scalar, aten.gather.default,
    aten.squeeze_copy.dim, aten.unsqueeze_copy.default, aten.permute_copy.default, aten.view_copy.default,
    aten.expand_copy.default, aten.slice_copy.Tensor, aten.select_copy.int, aten.transpose_copy.int,
    aten.alias_copy.default)


@rule(*_BOTH)
def _both(low: _Lowering, node: fx.Node) -> Pair:
    if _is_noop(node):          # a whole-axis slice or scatter from the decomposition: keep the graph small
        return low.pair(low.arg(node.args[1 if node.target is aten.slice_scatter.default else 0]))
    ra, rk, ia, ik = low.parts(node)
    return Pair(low.op(node.target, *ra, **rk), low.op(node.target, *ia, **ik))


def _is_noop(node: fx.Node) -> bool:
    if node.target is aten.slice.Tensor:
        src = node.args[0]
    elif node.target is aten.slice_scatter.default:
        src = node.args[1]
    else:
        return False
    args = list(node.args) + [None] * 6
    dim, start, end, step = (args[1:5] if node.target is aten.slice.Tensor else args[2:6])
    return ((start or 0) == 0 and (step or 1) == 1 and (end is None or end >= 2**62)
            and _shape(src) == _shape(node))


def _repeat_is_expand(node: fx.Node) -> bool:
    shape, times = _shape(node.args[0]), node.args[1]
    return len(shape) == len(times) and all((isinstance(r, int) and r == 1) or (isinstance(s, int) and s == 1)
                                            for r, s in zip(times, shape))


def _scatter_bounds(node: fx.Node) -> tuple[int, int, int, int]:
    args = list(node.args) + [None] * 6
    dim, start, end, step = args[2:6]
    shape = _shape(node.args[0])
    dim = (dim or 0) % len(shape)
    size = shape[dim]
    start, end = start or 0, size if end is None else end
    start, end = (start + size if start < 0 else start), (end + size if end < 0 else end)
    return dim, max(0, min(start, size)), max(0, min(end, size)), step or 1


def _static_scatter(node: fx.Node) -> bool:
    try:
        dim, start, end, step = _scatter_bounds(node)
        int(_shape(node.args[0])[dim]), int(start), int(end)
    except (TypeError, ValueError):
        return False
    return step == 1 and int(start) <= int(end)


def _scatter_as_cat(low: _Lowering, node: fx.Node, involved: bool):
    # slice_scatter along a static axis as slices and a cat: torch.onnx writes slice_scatter as ScatterND,
    # which TVM's Relax importer rejects once the batch is dynamic (FITS's `spec[:, cut:] = 0`)
    dim, start, end, _ = (int(v) for v in _scatter_bounds(node))
    size = int(_shape(node.args[0])[dim])

    def part(dst, src):
        pieces = ([low.op(aten.slice.Tensor, dst, dim, 0, start)] if start > 0 else []) + [src] + \
                 ([low.op(aten.slice.Tensor, dst, dim, end, size)] if end < size else [])
        return pieces[0] if len(pieces) == 1 else low.op(aten.cat.default, pieces, dim)
    if not involved:
        return part(low.env[node.args[0]], low.env[node.args[1]])
    ra, _, ia, _ = low.parts(node)
    return Pair(part(ra[0], ra[1]), part(ia[0], ia[1]))


@rule(aten.copy.default)
def _copy(low: _Lowering, node: fx.Node) -> Pair:
    # copy(self, src) is src broadcast to self's shape: say so with expand_as (torch.onnx mistranslates a
    # broadcasting copy, e.g. FITS's `spec[:, cut:] = 0`)
    dst, src = low.pair(low.arg(node.args[0])), low.pair(low.arg(node.args[1]))
    same = _shape(node.args[0]) == _shape(node.args[1])

    def part(s, d):
        if s is None:
            return low.op(aten.zeros_like.default, d)
        return s if same else low.op(aten.expand_as.default, s, d)
    return Pair(part(src.re, dst.re), part(src.im, dst.re))


@rule(aten.resolve_conj.default, aten.resolve_neg.default)
def _identity(low: _Lowering, node: fx.Node) -> Pair:
    return low.pair(low.arg(node.args[0]))


def _negate_im(low: _Lowering, v: Pair) -> Pair:
    return Pair(v.re, None if v.im is None else low.op(aten.neg.default, v.im))


@rule(aten.conj_physical.default, aten.conj.default, aten._conj.default)
def _conj(low: _Lowering, node: fx.Node) -> Pair:
    return _negate_im(low, low.pair(low.arg(node.args[0])))


@rule(aten.full.default, aten.full_like.default, aten.new_full.default, aten.scalar_tensor.default,
      aten.zeros.default, aten.ones.default, aten.ones_like.default, aten.new_zeros.default,
      aten.new_ones.default, aten.empty.memory_format, aten.new_empty.default)
def _fill(low: _Lowering, node: fx.Node) -> Pair:
    t = node.target
    fill_at = {aten.full.default: 1, aten.full_like.default: 1, aten.new_full.default: 2,
               aten.scalar_tensor.default: 0}.get(t)
    value = node.args[fill_at] if fill_at is not None else (1 if t in (aten.ones.default,
                                                                       aten.ones_like.default,
                                                                       aten.new_ones.default) else 0)
    value = complex(value)
    kw = {k: REAL_OF.get(v, v) if k == "dtype" else v for k, v in node.kwargs.items()}
    args = [low.arg(a) for a in node.args]
    if args and isinstance(args[0], Pair):
        args[0] = args[0].re
    if t in (aten.ones.default, aten.ones_like.default, aten.zeros.default, aten.empty.memory_format):
        like = t is aten.ones_like.default
        target = aten.full_like.default if like else aten.full.default
        return Pair(low.op(target, args[0], value.real, **kw), low.op(target, args[0], value.imag, **kw))
    if t in (aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default):
        return Pair(low.op(aten.new_full.default, args[0], args[1], value.real, **kw),
                    low.op(aten.new_full.default, args[0], args[1], value.imag, **kw))
    re_args, im_args = list(args), list(args)
    re_args[fill_at], im_args[fill_at] = value.real, value.imag
    return Pair(low.op(t, *re_args, **kw), low.op(t, *im_args, **kw))


@rule(aten._to_copy.default)
def _to_copy(low: _Lowering, node: fx.Node):
    v = low.arg(node.args[0])
    dtype = node.kwargs.get("dtype")
    kw = {k: REAL_OF.get(a, a) if k == "dtype" else a for k, a in node.kwargs.items()}
    if isinstance(v, Pair):
        if dtype is not None and not dtype.is_complex:         # complex -> real keeps the real part
            return low.op(aten._to_copy.default, v.re, **kw)
        return Pair(low.op(aten._to_copy.default, v.re, **kw),
                    None if v.im is None else low.op(aten._to_copy.default, v.im, **kw))
    return Pair(low.op(aten._to_copy.default, v, **kw), None)


@rule(aten.complex.default)
def _complex(low: _Lowering, node: fx.Node) -> Pair:
    return Pair(low.arg(node.args[0]), low.arg(node.args[1]))


@rule(aten.polar.default)
def _polar(low: _Lowering, node: fx.Node) -> Pair:
    r, th = low.arg(node.args[0]), low.arg(node.args[1])
    return Pair(low.op(aten.mul.Tensor, r, low.op(aten.cos.default, th)),
                low.op(aten.mul.Tensor, r, low.op(aten.sin.default, th)))


@rule(aten.view_as_real.default)
def _view_as_real(low: _Lowering, node: fx.Node):
    v = low.pair(low.arg(node.args[0]))
    return low.op(aten.stack.default, [v.re, low.im_or_zeros(v)], -1)


@rule(aten.view_as_complex.default)
def _view_as_complex(low: _Lowering, node: fx.Node) -> Pair:
    t = low.arg(node.args[0])
    return Pair(low.op(aten.select.int, t, -1, 0), low.op(aten.select.int, t, -1, 1))


@rule(aten.real.default)
def _real(low: _Lowering, node: fx.Node):
    return low.pair(low.arg(node.args[0])).re


@rule(aten.imag.default)
def _imag(low: _Lowering, node: fx.Node):
    return low.im_or_zeros(low.pair(low.arg(node.args[0])))


@rule(aten.abs.default)
def _abs(low: _Lowering, node: fx.Node):
    v = low.pair(low.arg(node.args[0]))
    if v.im is None:
        return low.op(aten.abs.default, v.re)
    sq = low.op(aten.add.Tensor, low.op(aten.mul.Tensor, v.re, v.re), low.op(aten.mul.Tensor, v.im, v.im))
    return low.op(aten.sqrt.default, sq)


@rule(aten.angle.default)
def _angle(low: _Lowering, node: fx.Node):
    # atan2(im, re) spelled out: torch.onnx's atan2 gives -pi for (+0, negative), torch gives +pi, and a
    # real bin (DC, Nyquist) of a lowered FFT has im exactly 0 of either sign (a sum of x * 0.0)
    v = low.pair(low.arg(node.args[0]))
    re_, im = v.re, low.im_or_zeros(v)
    zero = low.op(aten.eq.Scalar, re_, 0.0)
    q = low.op(aten.atan.default, low.op(aten.div.Tensor, im, low.op(aten.where.ScalarSelf, zero, 1.0, re_)))
    q = low.op(aten.where.self, zero, low.op(aten.mul.Tensor, low.op(aten.sign.default, im), math.pi / 2), q)
    turn = low.op(aten.where.Scalar, low.op(aten.ge.Scalar, im, 0.0), math.pi, -math.pi)
    turn = low.op(aten.where.ScalarOther, low.op(aten.lt.Scalar, re_, 0.0), turn, 0.0)
    return low.op(aten.add.Tensor, q, turn)


@rule(aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar)
def _add(low: _Lowering, node: fx.Node) -> Pair:
    a, b = low.pair(low.arg(node.args[0])), low.pair(low.arg(node.args[1]))
    alpha = node.kwargs.get("alpha", 1)
    if alpha != 1:
        b = _scale_pair(low, b, complex(alpha))
    target = aten.sub.Tensor if node.target.overloadpacket is aten.sub else aten.add.Tensor
    return Pair(low.combine(a.re, b.re, target), low.combine(a.im, b.im, target))


def _scale_pair(low: _Lowering, v: Pair, c: complex) -> Pair:
    return _mul_pairs(low, v, Pair(c.real, c.imag or None))


def _mul_pairs(low: _Lowering, a: Pair, b: Pair) -> Pair:
    def f(x, y):
        if x is None or y is None:
            return None
        if not isinstance(x, fx.Node) and not isinstance(y, fx.Node):
            return x * y
        return low.op(aten.mul.Tensor, x, y) if isinstance(x, fx.Node) else low.op(aten.mul.Tensor, y, x)
    return Pair(low.combine(f(a.re, b.re), f(a.im, b.im), aten.sub.Tensor),
                low.combine(f(a.re, b.im), f(a.im, b.re), aten.add.Tensor))


@rule(aten.mul.Tensor, aten.mul.Scalar)
def _mul(low: _Lowering, node: fx.Node) -> Pair:
    return _mul_pairs(low, low.pair(low.arg(node.args[0])), low.pair(low.arg(node.args[1])))


@rule(aten.pow.Tensor_Scalar)
def _pow(low: _Lowering, node: fx.Node) -> Pair:
    n = node.args[1]
    if not (isinstance(n, int) or float(n).is_integer()) or not 1 <= n <= 64:
        raise low.fail(f"{node.target} with exponent {n} (only whole exponents 1..64)")
    base, out, n = low.pair(low.arg(node.args[0])), None, int(n)
    while n:                                        # square and multiply
        if n & 1:
            out = base if out is None else _mul_pairs(low, out, base)
        n >>= 1
        if n:
            base = _mul_pairs(low, base, base)
    return out


@rule(aten.div.Tensor, aten.div.Scalar)
def _div(low: _Lowering, node: fx.Node) -> Pair:
    a, b = low.pair(low.arg(node.args[0])), low.pair(low.arg(node.args[1]))
    if b.im is None:
        return Pair(low.op(aten.div.Tensor, a.re, b.re), None if a.im is None else low.op(aten.div.Tensor,
                                                                                         a.im, b.re))
    if not isinstance(b.re, fx.Node):                       # a complex scalar
        return _scale_pair(low, a, 1 / complex(b.re, b.im))
    num = _mul_pairs(low, a, _negate_im(low, b))
    den = low.op(aten.add.Tensor, low.op(aten.mul.Tensor, b.re, b.re), low.op(aten.mul.Tensor, b.im, b.im))
    return Pair(low.op(aten.div.Tensor, num.re, den), None if num.im is None else low.op(aten.div.Tensor,
                                                                                       num.im, den))


@rule(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _matmul(low: _Lowering, node: fx.Node) -> Pair:
    a, b = node.args[:2]
    if node.target is aten.bmm.default:
        # a Linear decomposes to bmm(view(expand(x)), view(expand(W))): as matmul(x, W), the weight is
        # not copied per batch item (fewer ops, and the ONNX graph keeps W a plain 2-D initializer)
        a2, b2 = _unexpanded(a), _unexpanded(b)
        if len(_shape(a2)) == 3 and len(_shape(b2)) == 2:
            return low.bilinear(aten.matmul.default, low.pair(low.arg(a2)), low.pair(low.arg(b2)))
    return low.bilinear(node.target, low.pair(low.arg(a)), low.pair(low.arg(b)))


def _unexpanded(node: fx.Node) -> fx.Node:
    """x for view(expand(x)) of the same shape, or of a 2-D x broadcast over a batch; else `node`."""
    if not (node.target is aten.view.default and isinstance(node.args[0], fx.Node)
            and node.args[0].target is aten.expand.default):
        return node
    base = node.args[0].args[0]
    if not isinstance(base, fx.Node) or _val(base) is None:
        return node
    if _shape(base) == _shape(node) or (len(_shape(base)) == 2 and _shape(base) == _shape(node)[1:]):
        return base
    return node


@rule(aten.addmm.default)
def _addmm(low: _Lowering, node: fx.Node) -> Pair:
    bias = low.pair(low.arg(node.args[0]))
    prod = low.bilinear(aten.mm.default, low.pair(low.arg(node.args[1])), low.pair(low.arg(node.args[2])))
    beta, alpha = complex(node.kwargs.get("beta", 1)), complex(node.kwargs.get("alpha", 1))
    if alpha != 1:
        prod = _scale_pair(low, prod, alpha)
    if beta != 1:
        bias = _scale_pair(low, bias, beta)
    add = aten.add.Tensor
    return Pair(low.combine(prod.re, bias.re, add), low.combine(prod.im, bias.im, add))


def _dims(node: fx.Node, ndim: int) -> list[int]:
    return [d % ndim for d in node.args[1]]


@rule(aten._fft_r2c.default)
def _fft_r2c(low: _Lowering, node: fx.Node) -> Pair:
    x, norm, onesided = low.pair(low.arg(node.args[0])), node.args[2], node.args[3]
    shape = _shape(node.args[0])
    dims = _dims(node, len(shape))
    sizes = [_static(shape[d], "an FFT", low) for d in dims]
    *first, last = dims
    n = sizes[-1]
    bins = n // 2 + 1 if onesided else n
    v = low.dft(x, last, len(shape), "r2c", n, bins, n, _scale(norm, n))
    for d, n_d in zip(first, sizes):
        v = low.dft(v, d, len(shape), "c2c", n_d, n_d, n_d, _scale(norm, n_d))
    return v


@rule(aten._fft_c2c.default)
def _fft_c2c(low: _Lowering, node: fx.Node) -> Pair:
    v, norm, forward = low.pair(low.arg(node.args[0])), node.args[2], node.args[3]
    shape = _shape(node.args[0])
    for d in _dims(node, len(shape)):
        n = _static(shape[d], "an FFT", low)
        v = low.dft(v, d, len(shape), "c2c" if forward else "c2cinv", n, n, n, _scale(norm, n))
    return v


@rule(aten._fft_c2r.default)
def _fft_c2r(low: _Lowering, node: fx.Node):
    v, norm, n = low.pair(low.arg(node.args[0])), node.args[2], node.args[3]
    shape = _shape(node.args[0])
    *first, last = _dims(node, len(shape))
    n = _static(n, "an inverse FFT", low)
    for d in first:
        n_d = _static(shape[d], "an inverse FFT", low)
        v = low.dft(v, d, len(shape), "c2cinv", n_d, n_d, n_d, _scale(norm, n_d))
    bins = _static(shape[last], "an inverse FFT", low)
    return low.dft(v, last, len(shape), "c2r", bins, n, n, _scale(norm, n)).re
