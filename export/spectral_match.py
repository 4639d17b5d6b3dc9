"""The FITS spectral pattern, recognised in a captured graph (torch.export's, or the real graph the complex
lowering makes): normalise -> a region affine in the normalised series -> de-normalise, shared over
channels or per channel. Owns the structural match and the probe that turns the region into the map
(M, c) of `kernels.spectral.SpectralMap`; not the ONNX forms (kernels/spectral.py) nor their choice (fits.py).

The match is structural and strict: the model's one input is normalised along time exactly as FITS does
(mean, subtract, var, + eps, sqrt, divide); every op between the normalised series and the value the
de-normalisation rescales is affine in what it reads from the series (FFTs, slices, permutes, a complex or
real linear map with constant weights, scatters into constant zeros, scaling by constants, sums), its other
operands constant; every output is that value times sqrt(var + eps) plus the mean, or times sqrt(var + eps)
alone; and the graph holds nothing else. Then the region is probed with the identity basis (float64 where
the ops allow) and the map checked on random series. Anything else is no match, with the reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.fx import GraphModule, Node

from edgeflex.kernels.spectral import SpectralMap

aten = torch.ops.aten

# Ops linear in every tensor argument that reads the series (the others must be constant).
_LINEAR = {
    "fft_rfft", "fft_irfft", "fft_fft", "fft_ifft", "fft_rfft2", "fft_irfft2", "fft_fft2", "fft_ifft2",
    "fft_rfftn", "fft_irfftn", "fft_fftn", "fft_ifftn", "fft_hfft", "fft_ihfft",
    "_fft_r2c", "_fft_c2r", "_fft_c2c",
    "slice", "select", "narrow", "permute", "view", "reshape", "_unsafe_view", "unsqueeze", "squeeze",
    "expand", "clone", "contiguous", "alias", "t", "transpose", "_to_copy", "to", "flip", "roll", "real",
    "imag", "view_as_real", "view_as_complex", "neg", "conj", "_conj", "resolve_conj", "conj_physical",
    "sum", "mean", "constant_pad_nd", "pad", "repeat", "index_select", "detach", "lift_fresh_copy",
    "split", "split_with_sizes", "chunk", "unbind", "unfold", "expand_as", "view_as", "reshape_as",
    # several arguments, each linear: sums, concatenations, scatters of one into another
    "add", "sub", "cat", "stack", "complex", "slice_scatter", "select_scatter", "copy", "index_put",
}
# Ops that pick between values by a mask: affine when the mask (argument 0, or 1 for masked_fill) is constant.
_MASKED = {"where": 0, "masked_fill": 1}
# Ops linear in each argument separately: at most one argument may read the series.
_BILINEAR = {"mul", "matmul", "mm", "bmm", "einsum", "linear", "dot", "addmm", "baddbmm", "addmv", "mv"}
# Ops whose value does not depend on their tensor arguments' values (only their shapes).
_CONSTANT = {"zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "fill", "new_zeros",
             "empty", "empty_like", "new_full", "scalar_tensor"}
# Nodes that compute nothing the outputs read (checks torch.export leaves).
_IGNORED = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "sym_size"}


@dataclass
class SpectralMatch:
    """What the recogniser found: the map, and what each graph output is ("y": de-normalised, "centred":
    the spectral path times sqrt(var + eps), without the mean)."""

    map: SpectralMap
    outputs: list[str]
    channels: int
    probe_dtype: str
    probe_err: float            # the map against the region on random series, relative

    def to_json(self) -> dict:
        return {"shared": not self.map.individual, "channels": self.channels, "seq_len": self.map.seq_len,
                "out_len": self.map.out_len, "eps": self.map.eps, "ddof": self.map.ddof,
                "outputs": self.outputs, "probe_dtype": self.probe_dtype, "probe_rel_err": self.probe_err}


class NoMatch(Exception):
    """The graph is not (exactly) the spectral pattern; the message says where it differs."""


def _op(n: Node) -> str:
    if n.op == "call_function" and n.target is operator.getitem:
        return "getitem"
    if n.op != "call_function":
        return n.op
    packet = getattr(n.target, "overloadpacket", None)
    return getattr(packet, "__name__", getattr(n.target, "__name__", str(n.target)))


def _is(n: Any, *ops: str) -> bool:
    return isinstance(n, Node) and _op(n) in ops


def _is_size(n: Node) -> bool:
    """A node computing a size (a symbolic batch under a dynamic-batch capture), not tensor data."""
    val = n.meta.get("val")
    if n.op == "call_function" and _op(n) in ("sym_size", "sym_numel", "sym_stride"):
        return True
    return n.op == "call_function" and val is not None and not isinstance(val, torch.Tensor) \
        and isinstance(val, (int, torch.SymInt))


def _tensor_args(n: Node) -> list[Node]:
    """The nodes `n` reads as data (sizes aside)."""
    out: list[Node] = []
    torch.fx.node.map_arg((n.args, n.kwargs), lambda a: out.append(a) or a)
    return [a for a in out if not _is_size(a)]


def _size_args(n: Node) -> list[Node]:
    out: list[Node] = []
    torch.fx.node.map_arg((n.args, n.kwargs), lambda a: out.append(a) or a)
    return [a for a in out if _is_size(a)]


def _where(n: Node) -> str:
    trace = n.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File")]
    return f"{n.name} ({_op(n)})" + (f", {lines[-1]}" if lines else "")


def _descendants(start: Node) -> set[Node]:
    """The nodes whose data depends on `start` (sizes read from it do not count)."""
    seen, todo = {start}, [start]
    while todo:
        for u in todo.pop().users:
            if u not in seen and not _is_size(u):
                seen.add(u)
                todo.append(u)
    return seen


def _ancestors(start: Node, stop: Node, sizes: bool = False) -> set[Node]:
    """The nodes `start` reads as data, back to `stop`; with `sizes`, also the size nodes it reads (not
    what those read)."""
    seen, todo = {start}, [start]
    while todo:
        n = todo.pop()
        if n is stop or (_is_size(n) and not sizes):
            continue
        reads = _size_args(n) if _is_size(n) else _tensor_args(n) + (_size_args(n) if sizes else [])
        for a in reads:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def _time_dim(dims: Any, rank: int) -> bool:
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    return len(dims) == 1 and isinstance(dims[0], int) and dims[0] % rank == 1


def _normalisation(x: Node) -> dict[str, Any]:
    """The FITS normalisation of `x` [B, L, C] along time: its nodes, eps and ddof."""
    means = [u for u in x.users if _is(u, "mean") and _time_dim(u.args[1], 3)
             and (u.args[2] if len(u.args) > 2 else u.kwargs.get("keepdim", False))]
    for mean in means:
        for sub in (u for u in x.users if _is(u, "sub") and u.args[:2] == (x, mean)):
            for var in (u for u in sub.users if _is(u, "var")):
                ddof = _ddof(var)
                if ddof is None:
                    continue
                for add in (u for u in var.users if _is(u, "add") and u.args[0] is var
                            and isinstance(u.args[1], float) and u.args[1] > 0):
                    sqrts = [u for u in add.users if _is(u, "sqrt")]
                    zs = [u for s in sqrts for u in s.users if _is(u, "div") and u.args[:2] == (sub, s)]
                    if len(zs) == 1:
                        return {"mean": mean, "sub": sub, "var": var, "add": add, "sqrts": set(sqrts),
                                "z": zs[0], "eps": float(add.args[1]), "ddof": ddof}
    raise NoMatch("the input is not normalised as FITS does (x - mean over time, divided by "
                  "sqrt(var + eps), var over time with keepdim)")


def _ddof(var: Node) -> int | None:
    """The correction of a var over time with keepdim (aten.var.dim / var.correction), else None."""
    args, kw = var.args, var.kwargs
    if len(args) < 2 or not _time_dim(args[1], 3):
        return None
    name = var.target._overloadname if hasattr(var.target, "_overloadname") else ""
    if name == "dim":
        unbiased = args[2] if len(args) > 2 else kw.get("unbiased", True)
        keep = args[3] if len(args) > 3 else kw.get("keepdim", False)
        ddof = 1 if unbiased else 0
    elif name == "correction":
        ddof = kw.get("correction", 1)
        keep = kw.get("keepdim", False)
    else:
        return None
    return int(ddof) if keep and ddof in (0, 1) else None


def _denormalised(o: Any, norm: dict[str, Any]) -> tuple[str, Node]:
    """("y" | "centred", the region's output) for a graph output of the pattern."""
    def scaled(m: Any) -> Node | None:
        if _is(m, "mul"):
            a, b = m.args[:2]
            for r, s in ((a, b), (b, a)):
                if s in norm["sqrts"] and isinstance(r, Node):
                    return r
        return None

    if _is(o, "add") and len(o.args) >= 2 and o.kwargs.get("alpha", 1) == 1:
        a, b = o.args[:2]
        for m, mean in ((a, b), (b, a)):
            if mean is norm["mean"] and (r := scaled(m)) is not None:
                return "y", r
    if (r := scaled(o)) is not None:
        return "centred", r
    raise NoMatch(f"output {o} is not the spectral path times sqrt(var + eps) (plus the mean)")


def _check_affine(region: set[Node], z: Node, reads: set[Node]) -> None:
    """Every node of the region is affine in the region's values it reads; its other operands constant."""
    for n in region:
        op = _op(n)
        live = [a for a in _tensor_args(n) if a in region or a is z]
        other = [a for a in _tensor_args(n) if a not in region and a is not z]
        if any(a in reads for a in other):
            raise NoMatch(f"{_where(n)} reads the input other than through the normalised series")
        if op in _CONSTANT or op == "getitem" and _is(n.args[0], *_LINEAR):
            continue
        if op in _LINEAR:
            if op == "index_put" and any(a in region or a is z for a in _tensor_args_list(n.args[1])):
                raise NoMatch(f"{_where(n)}: indices computed from the series")
            continue
        if op in _BILINEAR:
            # the product's factors (x * x counts twice); addmm and co. add their first argument
            factors = [a for a in _tensor_args_list(n.args[1:3] if op.startswith("add") or op == "baddbmm"
                                                    else (n.args, n.kwargs)) if a in region or a is z]
            if len(factors) > 1:
                raise NoMatch(f"{_where(n)} multiplies two values computed from the series: not affine")
            continue
        if op in _MASKED:
            mask = n.args[_MASKED[op]]
            if mask in live:
                raise NoMatch(f"{_where(n)} picks by a mask computed from the series: not affine")
            continue
        if op == "div":
            if n.args[1] in live:
                raise NoMatch(f"{_where(n)} divides by a value computed from the series: not affine")
            continue
        raise NoMatch(f"{_where(n)}: {op!r} is not among the ops the spectral recogniser knows to be affine")


def _tensor_args_list(indices: Any) -> list[Node]:
    out: list[Node] = []
    torch.fx.node.map_arg(indices, lambda a: out.append(a) or a)
    return out


def find(gm: GraphModule) -> tuple[dict[str, Any], Node, list[str], set[Node]]:
    """The structural match: (normalisation, the region's output node, output kinds, region nodes).
    Raises NoMatch naming the first difference."""
    g = gm.graph
    inputs = [n for n in g.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise NoMatch(f"{len(inputs)} inputs; the spectral pattern has one")
    x = inputs[0]
    val = x.meta.get("val")
    if val is not None and (val.dim() != 3 or val.dtype != torch.float32):
        raise NoMatch(f"input {tuple(val.shape)} {val.dtype}; the pattern takes float32 [batch, L, C]")
    norm = _normalisation(x)
    z = norm["z"]
    out_node = next(n for n in g.nodes if n.op == "output")
    outs = out_node.args[0]
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    kinds, ends = zip(*(_denormalised(o, norm) for o in outs)) if outs else ((), ())
    if not ends or len(set(ends)) != 1:
        raise NoMatch("the outputs do not all de-normalise one spectral path")
    end = ends[0]
    reads = _descendants(x)
    region = _descendants(z) & _ancestors(end, z)
    region.discard(z)
    if end not in region:
        raise NoMatch("the de-normalised value does not depend on the normalised series")
    _check_affine(region, z, reads - region - {z})
    denorm = {o for o in outs} | {m for o in outs if _is(o, "add") for m in o.args[:2] if _is(m, "mul")}
    known = {x, norm["mean"], norm["sub"], norm["var"], norm["add"], z, *norm["sqrts"], *region, *denorm}
    for n in g.nodes:
        if n in known or n.op in ("output", "get_attr") or n not in reads or _is_size(n):
            continue
        guard = n.op == "call_module" and str(n.target).startswith("_guards")
        if not n.users and (_op(n) in _IGNORED or guard):
            continue
        raise NoMatch(f"{_where(n)} computes something besides the spectral pattern")
    for n in region - {end}:
        if any(u not in region for u in n.users if u.users or _op(u) not in _IGNORED):
            raise NoMatch(f"{_where(n)} inside the spectral path is used outside it")
    return norm, end, list(kinds), region


def _fetch(gm: GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj.detach() if isinstance(obj, torch.Tensor) else obj


_WIDER = {torch.float32: torch.float64, torch.complex64: torch.complex128, torch.float16: torch.float64}


def region_fn(gm: GraphModule, z: Node, end: Node, wide: bool):
    """The region as a function of the normalised series (float64 if `wide`). A size the region reads from
    outside it (the batch, under a dynamic capture) is read from the series, which has the input's shape."""
    needed = _ancestors(end, z, sizes=True)
    sub = torch.fx.Graph()
    env: dict[Node, Node] = {z: sub.placeholder("z")}
    consts: list[torch.Tensor] = []

    def widen(a: Any) -> Any:
        return _WIDER.get(a, a) if wide and isinstance(a, torch.dtype) else a

    for n in gm.graph.nodes:
        if n not in needed or n is z:
            continue
        if _is_size(n) and _op(n) == "sym_size":
            env[n] = sub.call_function(n.target, (env.get(n.args[0], env[z]), *n.args[1:]))
            continue
        if n.op == "get_attr":
            t = _fetch(gm, n.target)
            if wide and isinstance(t, torch.Tensor):
                t = t.to(_WIDER.get(t.dtype, t.dtype))
            env[n] = sub.placeholder(f"const{len(consts)}")
            consts.append(t)
        elif n.op == "call_function":
            new = sub.node_copy(n, lambda a: env[a])
            new.args = torch.fx.node.map_aggregate(new.args, widen)
            new.kwargs = torch.fx.node.map_aggregate(new.kwargs, widen)
            env[n] = new
        else:
            raise NoMatch(f"{_where(n)} ({n.op}) inside the spectral path")
    sub.output(env[end])
    module = GraphModule(torch.nn.Module(), sub)
    dtype = torch.float64 if wide else torch.float32
    return lambda zz: module(zz.to(dtype), *consts)


def probe(gm: GraphModule, z: Node, end: Node, shape: tuple[int, int, int], eps: float,
          ddof: int) -> tuple[SpectralMap, str, float]:
    """The region's map from the identity basis, checked on random series; float64 where the ops allow."""
    B, L, C = shape
    last: Exception | None = None
    for wide in (True, False):
        try:
            fn = region_fn(gm, z, end, wide)
            return _probe_with(fn, B, L, C, eps, ddof, wide)
        except NoMatch:
            raise
        except Exception as e:  # noqa: BLE001 - an op without float64 support: try float32
            last = e
    raise NoMatch(f"the spectral path could not be run on a probe: {type(last).__name__}: {last}")


def _run_rows(fn, rows: torch.Tensor, B: int) -> torch.Tensor:
    """fn over the rows [N, L, C] in batches of the graph's batch size B (padded with zeros)."""
    outs = []
    for i in range(0, rows.shape[0], B):
        chunk = rows[i:i + B]
        pad = B - chunk.shape[0]
        if pad:
            chunk = torch.cat([chunk, chunk.new_zeros((pad, *chunk.shape[1:]))])
        with torch.no_grad():
            y = fn(chunk)
        if not isinstance(y, torch.Tensor) or y.dim() != 3 or y.shape[0] != B \
                or y.shape[2] != chunk.shape[2] or y.is_complex():
            raise NoMatch(f"the spectral path gives {getattr(y, 'shape', type(y))}; expected real "
                          f"[{B}, n, {chunk.shape[2]}]")
        outs.append(y[:B - pad].to(torch.float64))
    return torch.cat(outs)


def _probe_with(fn, B: int, L: int, C: int, eps: float, ddof: int,
                wide: bool) -> tuple[SpectralMap, str, float]:
    dtype = torch.float64 if wide else torch.float32
    basis = torch.cat([torch.zeros(1, L), torch.eye(L)]).to(dtype)            # [L + 1, L]: 0, e_0 .. e_L-1
    rows = basis[:, :, None].expand(L + 1, L, C).contiguous()
    out = _run_rows(fn, rows, B)                                                # [L + 1, n, C]
    c = out[0]                                                                  # [n, C]
    M = (out[1:] - c).permute(2, 1, 0)                                          # [C, n, L]
    g = torch.Generator().manual_seed(0)
    zr = torch.randn(2 * B + 1, L, C, generator=g, dtype=torch.float64)
    zr = zr - zr.mean(dim=1, keepdim=True)
    want = _run_rows(fn, zr.to(dtype), B)
    got = torch.einsum("cnl,blc->bnc", M, zr) + c
    scale = float(want.abs().max()) or 1.0
    err = float((got - want).abs().max()) / scale
    tol = 1e-9 if wide else 1e-5
    if not err <= tol:
        raise NoMatch(f"the spectral path is not one affine map per channel (probe error {err:.2g} > "
                      f"{tol:g}): it mixes channels or batch rows")
    Mn, cn = M.numpy(), c.T.numpy()                                             # [C, n, L], [C, n]
    shared = np.allclose(Mn, Mn[:1], rtol=0, atol=tol * max(np.abs(Mn).max(), 1e-30)) and \
        np.allclose(cn, cn[:1], rtol=0, atol=tol * max(np.abs(cn).max(), 1e-30))
    if shared:
        Mn, cn = Mn[0], cn[0]
    n = Mn.shape[-2]
    return SpectralMap(L, n, Mn, cn, eps, ddof), "float64" if wide else "float32", err


def match(gm: GraphModule, example: torch.Tensor) -> SpectralMatch:
    """The spectral pattern of `gm` (one input, shaped like `example` [B, L, C]) as a SpectralMatch;
    raises NoMatch with the reason when the graph is not exactly that pattern."""
    if example.dim() != 3:
        raise NoMatch(f"input of rank {example.dim()}; the pattern takes [batch, L, channels]")
    gm = _merged(gm)
    norm, end, kinds, _ = find(gm)
    B, L, C = example.shape
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    val = x.meta.get("val", x.meta.get("tensor_meta"))
    if val is not None and isinstance(val.shape[0], int):
        B = val.shape[0]                  # a graph captured at a static batch runs at that batch only
    smap, dtype, err = probe(gm, norm["z"], end, (B, L, C), norm["eps"], norm["ddof"])
    if L < 2:
        raise NoMatch(f"sequence of length {L}")
    return SpectralMatch(smap, kinds, C, dtype, err)


def _merged(gm: GraphModule) -> GraphModule:
    """`gm` with identical computations merged (torch.fx's CSE pass; impure ops are left alone), as a new
    module: user code that writes `x - mean` twice (once for the variance, once to divide) captures two
    subtractions, which the strict match would otherwise see as two different series. `gm` itself when
    the pass fails."""
    from torch.fx.passes.dialect.common.cse_pass import CSEPass

    try:
        return CSEPass()(gm).graph_module
    except Exception:  # noqa: BLE001 - no merge: the match runs on the graph as captured
        return gm


def capture(model: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> GraphModule:
    """The model's torch.export graph, functional (in-place writes as scatters), parameters as attributes."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, example, strict=False).run_decompositions({})
    return ep.module()
