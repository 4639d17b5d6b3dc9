"""Only the DFT bins a lowered graph uses: after `complex.lower_complex`, a slice of a DFT's output becomes a
DFT with fewer columns, and zero bins fed to an inverse DFT become fewer rows (FITS's low-pass and zero
padding, FNO's kept modes). Exact: the same products, minus those that were sliced away or multiplied 0.

It owns these rewrites of a real FX graph only, each small and local, applied until none applies:
- a slice is pushed through `transpose`, `add`/`sub`/`neg`, a `cat` along its axis and another slice of
  the same axis, into `matmul(x, W)` with W a 2-D constant: W's columns (last axis) or x's rows (others);
- a transpose of a `cat` holding zeros becomes a cat of transposes;
- `matmul(cat([..., zeros, ...], -1), W)` drops the zero pieces and W's matching rows.
Cut constants keep their buffer's name plus `_cols<start>_<end>` / `_rows<start>_<end>`.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

aten = torch.ops.aten
_MAX_ROUNDS = 200


def prune_bins(gm: fx.GraphModule, example: tuple[torch.Tensor, ...]) -> int:
    """Rewrite `gm` in place; return the number of rewrites."""
    total, cuts = 0, {}
    for _ in range(_MAX_ROUNDS):
        with torch.no_grad():
            ShapeProp(gm).propagate(*example)
        done = _Rewriter(gm, cuts).sweep()
        if not done:
            break
        total += done
        gm.graph.eliminate_dead_code()
        gm.recompile()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers()):
        if "." not in name and name not in used:
            delattr(gm, name)
    gm.graph.lint()
    gm.recompile()
    return total


def _shape(n) -> tuple | None:
    meta = n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, cuts: dict):
        self.gm = gm
        self.g = gm.graph
        self.cuts = cuts            # (buffer, what) -> the cut buffer's name, shared by every round

    def sweep(self) -> int:
        count = 0
        for node in list(self.g.nodes):
            if node.op != "call_function" or not node.users or _shape(node) is None:
                continue
            with self.g.inserting_before(node):
                if node.target is aten.slice.Tensor:
                    new = self.push_slice(node)
                elif node.target is aten.transpose.int:
                    new = self.transpose_cat(node)
                elif node.target is aten.matmul.default:
                    new = self.drop_zero_rows(node)
                else:
                    new = None
            if new is not None:
                node.replace_all_uses_with(new)
                count += 1
        return count

    # helpers
    def call(self, target, *args) -> fx.Node:
        return self.g.call_function(target, args)

    def weight(self, n) -> torch.Tensor | None:
        if isinstance(n, fx.Node) and n.op == "get_attr":
            t = getattr(self.gm, n.target, None)
            if isinstance(t, torch.Tensor) and t.dim() == 2:
                return t
        return None

    def cut(self, w: fx.Node, what: str, index) -> fx.Node:
        """A get_attr of buffer `w` cut by `index` (its name + `what`), one buffer per distinct cut."""
        key = (w.target, what)
        if key not in self.cuts or not hasattr(self.gm, self.cuts[key]):
            base = f"{w.target}_{what}"
            name, i = base, 1
            while hasattr(self.gm, name):
                name, i = f"{base}_{i}", i + 1
            self.gm.register_buffer(name, getattr(self.gm, w.target)[index].contiguous())
            self.cuts[key] = name
        return self.g.get_attr(self.cuts[key])

    def slice_(self, x, dim: int, start: int, end: int):
        shape = _shape(x)
        if shape is not None and start == 0 and end >= shape[dim]:
            return x
        return self.call(aten.slice.Tensor, x, dim, start, end)

    def is_zero(self, n) -> bool:
        if not isinstance(n, fx.Node):
            return n == 0
        if n.op == "get_attr":
            t = getattr(self.gm, n.target, None)
            return isinstance(t, torch.Tensor) and t.numel() <= 1 << 16 and not bool(t.any())
        if n.op != "call_function":
            return False
        t = n.target
        if t in (aten.full.default, aten.full_like.default):
            return n.args[1] == 0
        if t is aten.new_full.default:
            return n.args[2] == 0
        if t is aten.zeros_like.default:
            return True
        if t in (aten.expand_as.default, aten.expand.default, aten.slice.Tensor, aten.transpose.int,
                 aten.permute.default, aten.view.default, aten.clone.default, aten.unsqueeze.default):
            return self.is_zero(n.args[0])
        return False

    # rules
    def push_slice(self, node: fx.Node):
        args = list(node.args) + [None] * 5
        x, dim, start, end, step = args[:5]
        shape = _shape(x)
        if shape is None or (step or 1) != 1 or not isinstance(start or 0, int) or \
                not (end is None or isinstance(end, int)):
            return None
        ndim = len(shape)
        dim = (dim or 0) % ndim
        size = shape[dim]
        start = start or 0
        end = size if end is None else end
        start, end = (start + size if start < 0 else start), (end + size if end < 0 else end)
        start, end = max(0, min(start, size)), max(0, min(end, size))
        if dim == 0 or start >= end:
            return None
        if start == 0 and end == size:
            return x
        if not isinstance(x, fx.Node) or x.op != "call_function":
            return None
        t = x.target
        if t is aten.transpose.int:
            a, b = (d % ndim for d in x.args[1:3])
            inner = b if dim == a else a if dim == b else dim
            return self.call(aten.transpose.int, self.slice_(x.args[0], inner, start, end), *x.args[1:3])
        if t in (aten.add.Tensor, aten.sub.Tensor):
            sides = []
            for s in x.args[:2]:
                sh = _shape(s)
                if isinstance(s, fx.Node) and (sh is None or len(sh) != ndim or sh[dim] != size):
                    return None
                sides.append(self.slice_(s, dim, start, end) if isinstance(s, fx.Node) else s)
            return self.call(t, *sides)
        if t is aten.neg.default:
            return self.call(t, self.slice_(x.args[0], dim, start, end))
        if t is aten.slice.Tensor:
            inner = list(x.args) + [None] * 5
            if (inner[1] or 0) % ndim == dim and (inner[4] or 1) == 1 and isinstance(inner[2] or 0, int):
                base = inner[2] or 0
                src = _shape(inner[0])
                base = base + src[dim] if base < 0 else base
                return self.slice_(inner[0], dim, base + start, base + end)
            return None
        if t is aten.cat.default:
            pieces = x.args[0]
            cat_dim = (x.args[1] if len(x.args) > 1 else 0) % ndim
            if cat_dim != dim:
                return None
            off = 0
            for p in pieces:
                if _shape(p) is None:
                    return None
                n = _shape(p)[dim]
                if off <= start and end <= off + n:
                    return self.slice_(p, dim, start - off, end - off)
                off += n
            return None
        if t is aten.matmul.default:
            xs, w = x.args
            weight = self.weight(w)
            if weight is None:
                return None
            if dim == ndim - 1:
                cols = self.cut(w, f"cols{start}_{end}", (slice(None), slice(start, end)))
                return self.call(aten.matmul.default, xs, cols)
            if _shape(xs) is not None and len(_shape(xs)) == ndim and _shape(xs)[dim] == size:
                return self.call(aten.matmul.default, self.slice_(xs, dim, start, end), w)
        return None

    def transpose_cat(self, node: fx.Node):
        x = node.args[0]
        if not (isinstance(x, fx.Node) and x.op == "call_function" and x.target is aten.cat.default):
            return None
        if any(_shape(p) is None for p in x.args[0]):
            return None
        pieces = x.args[0]
        if not any(self.is_zero(p) for p in pieces):
            return None
        ndim = len(_shape(node))
        a, b = (d % ndim for d in node.args[1:3])
        cat_dim = (x.args[1] if len(x.args) > 1 else 0) % ndim
        new_dim = b if cat_dim == a else a if cat_dim == b else cat_dim
        return self.call(aten.cat.default, [self.call(aten.transpose.int, p, a, b) for p in pieces], new_dim)

    def drop_zero_rows(self, node: fx.Node):
        x, w = node.args
        weight = self.weight(w)
        if weight is None or not isinstance(x, fx.Node) or x.op != "call_function" \
                or x.target is not aten.cat.default or _shape(x) is None:
            return None
        ndim = len(_shape(x))
        if (x.args[1] if len(x.args) > 1 else 0) % ndim != ndim - 1:
            return None
        keep, rows, off = [], [], 0
        if any(_shape(p) is None for p in x.args[0]):
            return None
        for p in x.args[0]:
            n = _shape(p)[-1]
            if not self.is_zero(p):
                keep.append(p)
                rows.extend(range(off, off + n))
            off += n
        if len(keep) == len(x.args[0]):
            return None
        if not keep:
            return None                    # all zero: leave it (rare; a zeros tensor would need its shape)
        src = keep[0] if len(keep) == 1 else self.call(aten.cat.default, keep, -1)
        what = f"rows{rows[0]}_{rows[-1] + 1}" if rows == list(range(rows[0], rows[-1] + 1)) else \
            f"rows{len(rows)}of{weight.shape[0]}"
        return self.call(aten.matmul.default, src, self.cut(w, what, torch.tensor(rows)))
