"""FFT interpolation, the FITS kernel: normalise -> rfft -> low-pass -> complex linear -> irfft ->
de-normalise.

Owns the NumPy reference and the lowerings to standard ONNX ops (three forms: `folded`, `lowrank`,
`dft`). Which form a bundle uses is measured by the exporter, not decided here. No torch.

The spectral path is linear in the centred input xc = x - mean, so with std = sqrt(var + eps)
    y = std * (M @ (xc / std) + c) + mean = M @ xc + c * std + mean
where M ([L+H, L]) and c ([L+H]) fold the truncated DFT, the complex linear layer, the zero padding,
the inverse DFT and the (L+H)/L energy scale. The division by std cancels: the GEMMs see the normalised
series and one small rescale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMS = ("folded", "lowrank", "dft")
OPSET = 17


@dataclass(frozen=True)
class SpectralWeights:
    """The trained state of a FITS layer, as plain arrays.

    `weight` is complex [up, cut] (or [channels, up, cut] when `individual`), `bias` complex [up]
    (or [channels, up]); `up = int(cut * (seq_len + pred_len) / seq_len)` as in the paper.
    """

    seq_len: int
    pred_len: int
    weight: np.ndarray
    bias: np.ndarray
    eps: float = 1e-5

    @property
    def individual(self) -> bool:
        return self.weight.ndim == 3

    @property
    def cut_freq(self) -> int:
        return self.weight.shape[-1]

    @property
    def up_freq(self) -> int:
        return self.weight.shape[-2]

    @property
    def out_len(self) -> int:
        return self.seq_len + self.pred_len

    def check(self) -> None:
        L, n = self.seq_len, self.out_len
        if not 1 <= self.cut_freq <= L // 2 + 1:
            raise ValueError(f"cut_freq {self.cut_freq} out of range: expected 1..{L // 2 + 1} "
                             f"for seq_len {L}")
        if self.up_freq > n // 2 + 1:
            raise ValueError(f"upsampled spectrum has {self.up_freq} bins, more than the {n // 2 + 1} of "
                             f"an output of length {n}; lower cut_freq")
        if self.bias.shape != self.weight.shape[:-1]:
            raise ValueError(f"bias shape {self.bias.shape} does not match weight {self.weight.shape}")


@dataclass(frozen=True)
class SpectralMap:
    """A FITS-like spectral path known only as what it computes: the affine map z -> M @ z + c from the
    normalised series z = (x - mean) / sqrt(var + eps) to the series the de-normalisation rescales, as the
    exporter's pattern recogniser probes it from a user's graph (no complex weights needed).

    `M` is [n, L] (or [channels, n, L] per channel), `c` [n] (or [channels, n]); `ddof` is the variance's
    correction (1: torch.var's default, unbiased; 0: biased). Offers the `folded` and `lowrank` forms.
    """

    seq_len: int
    out_len: int
    M: np.ndarray
    c: np.ndarray
    eps: float = 1e-5
    ddof: int = 1

    @property
    def individual(self) -> bool:
        return self.M.ndim == 3

    @property
    def channels(self) -> int | None:
        return self.M.shape[0] if self.individual else None

    def check(self) -> None:
        if self.M.shape[-2:] != (self.out_len, self.seq_len) or self.c.shape != self.M.shape[:-1]:
            raise ValueError(f"map shapes M {self.M.shape}, c {self.c.shape} do not fit seq_len "
                             f"{self.seq_len} and out_len {self.out_len}: expected M [(C,) n, L], c [(C,) n]")
        if self.ddof not in (0, 1) or self.seq_len <= self.ddof:
            raise ValueError(f"ddof {self.ddof} with seq_len {self.seq_len}: expected ddof 0 or 1 < seq_len")

    @classmethod
    def of(cls, w: SpectralWeights) -> SpectralMap:
        """The map of known complex weights (what the recogniser recovers from their FITS's graph)."""
        M, c = folded(w)
        return cls(w.seq_len, w.out_len, M, c, w.eps)


FORMS_OF_MAP = ("folded", "lowrank")


def map_cut(M: np.ndarray, tol: float = 1e-6) -> int:
    """The lowest cut frequency whose truncated DFT spans the rows of M [..., n, L]: one more than the
    highest DFT bin with energy above `tol` of the largest (L // 2 + 1 when every bin is used). `tol` sits
    above float32 rounding: a map probed through float32 DFT matrices has ~1e-7 in the bins it never uses."""
    spec = np.abs(np.fft.rfft(np.asarray(M, np.float64), axis=-1))            # [..., n, L//2 + 1]
    energy = spec.reshape(-1, spec.shape[-1]).max(axis=0)
    live = np.flatnonzero(energy > tol * max(float(energy.max()), 1e-300))
    return int(live.max()) + 1 if live.size else 1


def _var_scale(w: SpectralWeights | SpectralMap) -> tuple[float, float]:
    """(c_scale, LayerNormalization's epsilon): the model's std = c_scale * rho, where
    rho = sqrt(biased var + eps')."""
    L, ddof = w.seq_len, getattr(w, "ddof", 1)
    return float(np.sqrt(L / (L - ddof))), w.eps * (L - ddof) / L


def reference(x: np.ndarray, w: SpectralWeights) -> np.ndarray:
    """The slow, obvious FITS forward in NumPy (float64 inside): x [B, L, C] -> [B, L+H, C]."""
    x = np.asarray(x, dtype=np.float64)
    L, n, cut, up = w.seq_len, w.out_len, w.cut_freq, w.up_freq
    mean = x.mean(axis=1, keepdims=True)
    xc = x - mean
    std = np.sqrt(xc.var(axis=1, ddof=1, keepdims=True) + w.eps)
    spec = np.fft.rfft(xc / std, axis=1)[:, :cut, :]                       # [B, cut, C]
    if w.individual:
        spec_up = np.einsum("cuk,bkc->buc", w.weight, spec) + w.bias.T[None]
    else:
        spec_up = np.einsum("uk,bkc->buc", w.weight, spec) + w.bias[None, :, None]
    full = np.zeros((x.shape[0], n // 2 + 1, x.shape[2]), dtype=np.complex128)
    full[:, :up] = spec_up
    y = np.fft.irfft(full, n=n, axis=1) * (n / L)
    return (y * std + mean).astype(np.float32)


def _angles(freqs: np.ndarray, times: np.ndarray, n: int) -> np.ndarray:
    # k*t mod n in integers first: keeps the angle exact for long series.
    return 2.0 * np.pi * (np.outer(freqs, times) % n) / n


def forward_basis(seq_len: int, cut: int) -> tuple[np.ndarray, np.ndarray]:
    """Real rows of the truncated DFT: [r, L] with r <= 2*cut; identically-zero sine rows dropped.

    Returns the basis and, for each row, its index in the [Re_0..Re_cut-1, Im_0..Im_cut-1] layout.
    """
    k = np.arange(cut)
    ang = _angles(k, np.arange(seq_len), seq_len)
    rows = np.concatenate([np.cos(ang), -np.sin(ang)])
    keep = np.concatenate([np.ones(cut, bool), (k != 0) & (2 * k != seq_len)])
    return rows[keep], np.flatnonzero(keep)


def inverse_basis(out_len: int, up: int, seq_len: int) -> np.ndarray:
    """Columns mapping [Re_0..Re_up-1, Im_0..Im_up-1] to the irfft of length out_len, scaled by n/L.

    Like irfft, the imaginary parts of the DC and Nyquist bins are ignored.
    """
    n = out_len
    k = np.arange(up)
    ang = _angles(k, np.arange(n), n).T                                      # [n, up]
    edge = (k == 0) | (2 * k == n)
    alpha = np.where(edge, 1.0, 2.0) / n * (n / seq_len)
    return np.concatenate([np.cos(ang) * alpha, -np.sin(ang) * alpha * ~edge], axis=1)


def complex_linear_real(weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The complex layer u = W s + b as a real block map on [Re s, Im s] -> [Re u, Im u]."""
    wr, wi = weight.real, weight.imag
    top = np.concatenate([wr, -wi], axis=-1)
    bot = np.concatenate([wi, wr], axis=-1)
    return np.concatenate([top, bot], axis=-2), np.concatenate([bias.real, bias.imag], axis=-1)


def lowrank_factors(w: SpectralWeights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 (F [r, L], G [(C,) n, r], c [(C,) n]) with y_centred = G @ (F @ xc) + c * std.
    For a `SpectralMap`, F is the truncated DFT up to `map_cut(M)` and G the rows' coordinates in it."""
    w.check()
    if isinstance(w, SpectralMap):
        M = w.M.astype(np.float64)
        F, _ = forward_basis(w.seq_len, map_cut(M))
        G = M @ (F.T / np.sum(F * F, axis=1))                                # F's rows are orthogonal
        return F, G, w.c.astype(np.float64)
    F, rows = forward_basis(w.seq_len, w.cut_freq)
    inv = inverse_basis(w.out_len, w.up_freq, w.seq_len)                    # [n, 2up]
    Wr, br = complex_linear_real(w.weight.astype(np.complex128), w.bias.astype(np.complex128))
    G = inv @ Wr[..., rows]                                                # [(C,) n, r]
    c = np.einsum("nu,...u->...n", inv, br)
    return F, G, c


def folded(w: SpectralWeights | SpectralMap) -> tuple[np.ndarray, np.ndarray]:
    """Float64 (M [(C,) n, L], c [(C,) n]): the whole spectral path as one matrix."""
    if isinstance(w, SpectralMap):
        return w.M.astype(np.float64), w.c.astype(np.float64)
    F, G, c = lowrank_factors(w)
    return G @ F, c


def matrix_reference(x: np.ndarray, w: SpectralWeights) -> np.ndarray:
    """The folded-matrix form in NumPy, for tests of the algebra (no normalisation shortcuts hidden)."""
    x = np.asarray(x, dtype=np.float64)
    M, c = folded(w)
    mean = x.mean(axis=1, keepdims=True)
    xc = x - mean
    std = np.sqrt(xc.var(axis=1, ddof=1, keepdims=True) + w.eps)
    if w.individual:
        y = np.einsum("cnl,blc->bnc", M, xc) + c.T[None] * std
    else:
        y = np.einsum("nl,blc->bnc", M, xc) + c[None, :, None] * std
    return (y + mean).astype(np.float32)


def macs(w: SpectralWeights | SpectralMap, form: str) -> int:
    """Multiply-accumulates per sample per channel of the spectral core of each form (normalisation aside)."""
    L, n = w.seq_len, w.out_len
    if form == "folded":
        return n * L
    cut = map_cut(w.M) if isinstance(w, SpectralMap) else w.cut_freq
    if form == "lowrank":
        r = len(forward_basis(L, cut)[1])
        return r * L + n * r
    if form == "dft" and isinstance(w, SpectralWeights):
        # radix-2 or Bluestein FFTs in the engine: count as ~5 n log2 n real flops each way.
        fft = int(2.5 * (L * np.log2(L) + n * np.log2(n)))
        return fft + 4 * cut * w.up_freq
    raise ValueError(f"unknown spectral form {form!r}; expected one of {FORMS}")


# Initializer names of the weight-dependent GEMM operands in the `folded` / `lowrank` graphs, in order.
GEMM_NAMES = ("spectral.gemm0", "spectral.gemm1")


def gemm_operands(w: SpectralWeights | SpectralMap, form: str) -> list[np.ndarray]:
    """Float64 right-hand operands of the `folded` (one) or `lowrank` (two) graph's MatMuls, in graph order.

    The graph computes h = y_n @ ops[0] ... then [h * rho, rho, mean] @ ops[-1]: the last operand carries the
    affine epilogue as two extra rows (c * c_scale and ones). NumPy only: the runtime derives them at load.
    """
    if form == "folded":
        M, c = folded(w)
        mats = [M]
    elif form == "lowrank":
        F, G, c = lowrank_factors(w)
        # The DC row of the DFT basis maps a centred series to exactly 0: drop it and its column.
        mats = [F[1:], G[..., 1:]]
    else:
        raise ValueError(f"form {form!r} has no GEMM operands; expected 'folded' or 'lowrank'")
    c_scale = _var_scale(w)[0]                                               # std = rho * c_scale
    # [h, rho, mean] @ [last, c * c_scale, 1]^T: the affine epilogue rides in the GEMM.
    last = mats[-1]
    last = np.concatenate([last, c[..., None] * c_scale, np.ones(last.shape[:-1] + (1,))], axis=-1)
    return [np.swapaxes(m, -1, -2) for m in (*mats[:-1], last)]


def nested(w: SpectralWeights, cut_freq: int) -> SpectralWeights:
    """The FITS of a smaller cut frequency inside `w`: the top-left block weight[..., :up, :cut] and
    bias[..., :up], with up = int(cut * (L + H) / L) as FITS computes it (elastic FITS levels)."""
    if not 1 <= cut_freq <= w.cut_freq:
        raise ValueError(f"cut_freq {cut_freq} out of range: expected 1..{w.cut_freq} (the stored level)")
    up = int(cut_freq * (w.seq_len + w.pred_len) / w.seq_len)
    return SpectralWeights(w.seq_len, w.pred_len, w.weight[..., :up, :cut_freq], w.bias[..., :up], w.eps)


# --- ONNX lowerings ---------------------------------------------------------------------------------------

def to_onnx(w: SpectralWeights | SpectralMap, form: str, *, input_name: str = "x", output_name: str = "y",
            channels: int | None = None, outputs: list[tuple[str, str]] | None = None,
            layer_norm: bool = True):
    """A standalone ONNX model (opset 17) computing FITS: input [batch, L, C] float32 -> [batch, L+H, C].

    `channels` fixes C in the graph's signature (required for `individual`, optional otherwise).
    `outputs`: the graph's outputs in order as (name, kind), kind "y" (the de-normalised output) or
    "centred" (y - mean, as the FITS authors' second output `low_xy * sqrt(var)`);
    default [(output_name, "y")].
    The graph works channel-major ([B, C, L], or [C, B, L] for `individual`): every reduction and GEMM
    then runs along contiguous rows, and the de-normalisation rides in the last GEMM as two extra columns.
    `layer_norm`: the mean and variance by one LayerNormalization that also outputs its mean and inverse
    standard deviation (ONNX Runtime's fused kernel, and the ops the TVM kernel's rewrite matches); False:
    by ReduceMean, Sub, Mul, ReduceMean, Add, Sqrt, and the GEMMs read the centred series (TensorRT's ONNX
    parser takes only LayerNormalization's first output).
    """
    import onnx
    from onnx import TensorProto, helper

    w.check()
    allowed = FORMS_OF_MAP if isinstance(w, SpectralMap) else FORMS
    if form not in allowed:
        raise ValueError(f"unknown spectral form {form!r} for a {type(w).__name__}; expected one of "
                         f"{allowed}")
    outputs = outputs or [(output_name, "y")]
    if not outputs or any(kind not in ("y", "centred") for _, kind in outputs):
        raise ValueError(f"outputs {outputs}: expected (name, 'y' | 'centred') pairs")
    if w.individual:
        per = w.M.shape[0] if isinstance(w, SpectralMap) else w.weight.shape[0]
        if channels not in (None, per):
            raise ValueError(f"individual FITS has {per} channels, not {channels}")
        channels = per
    L, n = w.seq_len, w.out_len
    b = _Builder()
    x = b.op("Transpose", [input_name], perm=[2, 0, 1] if w.individual else [0, 2, 1])
    # NOTE: LayerNormalization is ORT's fused one-kernel mean/variance (two-pass exact, checked at
    # offsets up to 1e4); with eps' = eps*(L-1)/L, rho = 1/InvStdDev = sqrt((L-1)/L) * std, where std is
    # FITS's sqrt(unbiased var + eps). Y = xc / rho. Replaces five broadcast ops, each a pass of its own.
    # (A biased variance, ddof 0: eps' = eps and rho = std.)
    c_scale, eps_ln = _var_scale(w)                                          # std = rho * c_scale
    if layer_norm:
        ln = [b._name("ln_y"), b._name("mean"), b._name("inv_std")]
        b.nodes.append(_node("LayerNormalization", [x, b.const(np.ones(L)), b.const(np.zeros(L))], ln,
                             axis=-1, epsilon=eps_ln))
        y_n, mean, inv = ln
        rho = b.op("Reciprocal", [inv])                                      # [B, C, 1]
        xc = None
    else:
        # the same rho = sqrt(biased var + eps'), op by op; the centred series is what the GEMMs read
        mean = b.op("ReduceMean", [x], axes=[-1], keepdims=1)
        xc = b.op("Sub", [x, mean])
        var = b.op("ReduceMean", [b.op("Mul", [xc, xc])], axes=[-1], keepdims=1)
        rho = b.op("Sqrt", [b.op("Add", [var, b.const(np.float32(eps_ln))])])
    if form == "dft":
        core, c = _core_dft(b, w, xc if xc is not None else b.op("Mul", [y_n, rho]))
        y = b.op("Add", [core, b.op("Add", [b.op("Mul", [rho, b.const(c[..., None, :] * c_scale)]), mean])])
    else:
        operands = gemm_operands(w, form)
        h = y_n if xc is None else xc
        for i, m in enumerate(operands[:-1]):
            h = b.op("MatMul", [h, b.const(m, name=GEMM_NAMES[i])])
        if xc is None:
            h = b.op("Mul", [h, rho])                                        # back to the centred scale
        h = b.op("Concat", [h, rho, mean], axis=2)
        y = b.op("MatMul", [h, b.const(operands[-1], name=GEMM_NAMES[len(operands) - 1])])
    perm = [1, 2, 0] if w.individual else [0, 2, 1]
    y_name = next((name for name, kind in outputs if kind == "y"), None)
    y = b.op("Transpose", [y], perm=perm, name=y_name)
    for name, kind in outputs:
        if kind == "centred":
            # NOTE: y - mean (float32 y carries ~1e-7 |mean|), channel-major like the rest, read back from
            # the output y: the GEMM's own result stays inside the pattern the TVM kernel replaces (reading
            # it made TVM compute the GEMM again, 70x slower). ORT, L=720, batch 1: cheaper than a
            # ReduceMean of x and a Sub (+21 us over one output)
            back = b.op("Transpose", [y], perm=[2, 0, 1] if w.individual else [0, 2, 1])
            b.op("Transpose", [b.op("Sub", [back, mean])], perm=perm, name=name)
        elif name != y_name:
            b.op("Identity", [y], name=name)
    graph = helper.make_graph(
        b.nodes, f"fits_{form}",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", L, channels])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", n, channels])
         for name, _ in outputs],
        initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="edgeflex.kernels.spectral")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _core_dft(b: _Builder, w: SpectralWeights, xc: str):
    """ONNX DFT both ways on channel-major xc [B, C, L] ([C, B, L] individual); the complex layer as a
    real MatMul on [Re, Im]. Returns the centred output [B, C, n] and the time-domain bias image c."""
    L, n, cut, up = w.seq_len, w.out_len, w.cut_freq, w.up_freq
    m = n // 2 + 1
    spec = b.op("DFT", [b.op("Unsqueeze", [xc, b.i64([3])])], axis=2, onesided=1)   # [B, C, L//2+1, 2]
    spec = b.op("Slice", [spec, b.i64([0]), b.i64([cut]), b.i64([2])])               # [B, C, cut, 2]
    s = b.op("Transpose", [spec], perm=[0, 1, 3, 2])                                 # [B, C, 2, cut]
    s = b.op("Reshape", [s, b.i64([0, 0, 2 * cut])])
    Wr, br = complex_linear_real(w.weight.astype(np.complex128), w.bias.astype(np.complex128))
    # The bias enters before the inverse transform; its time-domain image is the c of the other forms.
    u = b.op("MatMul", [s, b.const(np.swapaxes(Wr, -1, -2) * (n / L))])            # [B, C, 2up]
    u = b.op("Reshape", [u, b.i64([0, 0, 2, up])])
    u = b.op("Transpose", [u], perm=[0, 1, 3, 2])                                    # [B, C, up, 2]
    u = b.op("Pad", [u, b.i64([0, 0, 0, 0, 0, 0, m - up, 0])])                       # [B, C, m, 2]
    # Hermitian completion: bins m..n-1 are the conjugates of bins n-m..1.
    tail = b.op("Slice", [u, b.i64([n - m]), b.i64([0]), b.i64([2]), b.i64([-1])])
    tail = b.op("Mul", [tail, b.const(np.array([1.0, -1.0]))])
    full = b.op("Concat", [u, tail], axis=2)                                         # [B, C, n, 2]
    y = b.op("DFT", [full], axis=2, inverse=1, onesided=0)
    y = b.op("Slice", [y, b.i64([0]), b.i64([1]), b.i64([3])])
    y = b.op("Squeeze", [y, b.i64([3])])                                             # [B, C, n]
    return y, np.einsum("nu,...u->...n", inverse_basis(n, up, L), br)


class _Builder:
    """Collects nodes and float32 initialisers for a hand-built ONNX graph."""

    def __init__(self):
        self.nodes, self.inits, self._n = [], [], 0

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value, name: str | None = None) -> str:
        from onnx import numpy_helper
        arr = np.asarray(value)
        arr = arr.astype(np.int64 if arr.dtype.kind in "iu" else np.float32)
        name = name or self._name("c")
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def i64(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64))

    def op(self, op_type: str, inputs: list[str], *, name: str | None = None, **attrs) -> str:
        out = name or self._name(op_type.lower())
        self.nodes.append(_node(op_type, inputs, [out], **attrs))
        return out


def _node(op_type: str, inputs: list[str], outputs: list[str], **attrs):
    from onnx import helper
    return helper.make_node(op_type, inputs, outputs, **attrs)


# --- the split (FFT-structured) form of the low-rank GEMMs, for edgeflex's TVM kernel --------------------

SPLIT = 16      # the radix both transforms are split by: the sequence and the output length must be multiples


@dataclass(frozen=True)
class SplitOperands:
    """The low-rank form's two GEMMs, re-factored the way an FFT splits a DFT, with ~2.3x fewer
    multiply-adds (FITS L=720, cut 60, L+H=816). Inputs are the low-rank form's operands, so the result is
    the same linear map (checked by `split_operands`).

    Forward, x (centred, length L = P*Q) -> the R spectral coefficients:
      A: Ar = D @ x viewed [P, Q] (n = Q*m + r): the P-point real DFT of each residue r, rows ordered
         c0, c1, s1, ..., c(P/2-1), s(P/2-1), c(P/2) so that a bin's cosine and sine rows are adjacent;
      B: coefficient i (frequency k) = sum_r of the twiddled (cos, sin) rows of bin j' = min(k mod P,
         P - k mod P): per group j', `Bc[j', t*Q + r, lane]` (lanes = the group's coefficients, padded with
         zero lanes) and `pos[j', lane]`, the coefficient's row in the low-rank order (-1: padding).
    Inverse, [s; rho] -> y (length n = P2*Q2, t = Q2*q + p), plus the mean:
      U: u = U^T [s; rho] (the complex linear layer and bias, 2*up real values, ordered by bin k mod P2);
      C: per pair i of bin groups (j, P2 - j; 0 and P2/2 alone), Z rows = T[off_i : off_i + nk_i]^T
         u[off_i : ...] (twiddles: Q2 values re (groups 0, P2/2) or 2*Q2 re/im x p, the pair summed);
      D: y[Q2*q + p] = sum_r E[r, q] Z[r, p] + mean (the P2-point inverse DFT of each p, on P2 rows).
    """

    seq_len: int
    out_len: int
    rank: int
    D: np.ndarray        # [P, P]
    Bc: np.ndarray       # [P/2 + 1, 2Q, nvec * 16]
    pos: np.ndarray      # [P/2 + 1, nvec * 16] int32
    U: np.ndarray        # [rank + 1, 2 * up]
    T: np.ndarray        # [2 * up, 2 * Q2]
    E: np.ndarray        # [P2, P2]
    group_off: tuple[int, ...]   # per pair of inverse bin groups: its first row in u / T
    group_len: tuple[int, ...]   # ... and its number of rows

    @property
    def q(self) -> int:
        return self.seq_len // SPLIT

    @property
    def q2(self) -> int:
        return self.out_len // SPLIT


def split_macs(s: SplitOperands) -> int:
    """Multiply-adds per sample per channel of the split form's five stages (normalisation aside)."""
    P, Q, Q2 = SPLIT, s.q, s.q2
    fwd = P * P * Q + sum(int((row >= 0).sum()) * (Q if g in (0, P // 2) else 2 * Q)
                          for g, row in enumerate(s.pos))
    inv = sum(c * (Q2 if i < 2 else 2 * Q2) for i, c in enumerate(s.group_len))
    return fwd + (s.rank + 1) * s.U.shape[1] + inv + (P + 1) * P * Q2


def split_applies(seq_len: int, out_len: int) -> bool:
    return seq_len % SPLIT == 0 and out_len % SPLIT == 0 and seq_len >= 2 * SPLIT and out_len >= 2 * SPLIT


def split_operands(F: np.ndarray, W: np.ndarray, *, tol: float = 1e-5) -> SplitOperands | None:
    """The split form of the low-rank operands F [L, R] and W [R + 2, n] (`gemm_operands(w, "lowrank")`, as
    the graph holds them), or None when they are not that form's (F not the truncated DFT without its DC
    row, or W's spectral rows not a map through the inverse DFT of some `up` bins) or the lengths are not
    multiples of `SPLIT`."""
    L, R = F.shape
    n = W.shape[1]
    if W.shape[0] != R + 2 or not split_applies(L, n):
        return None
    # R = 2 (cut - 1), less the Nyquist bin's sine row when cut - 1 = L / 2
    cut = (R + 2) // 2 if R % 2 == 0 else (R + 3) // 2
    basis, _ = forward_basis(L, cut)
    if basis.shape[0] != R + 1 or not np.allclose(F.T, basis[1:], atol=tol, rtol=0):
        return None
    up = int(cut * n / L)
    if up > n // 2 + 1:
        return None
    P, Q, P2, Q2 = SPLIT, L // SPLIT, SPLIT, n // SPLIT
    # forward, stage A: P-point real DFT rows, a bin's cos and sin adjacent
    order = [("c", 0)] + [(t, j) for j in range(1, P // 2) for t in ("c", "s")] + [("c", P // 2)]
    m = np.arange(P)
    D = np.stack([np.cos(2 * np.pi * j * m / P) if t == "c" else -np.sin(2 * np.pi * j * m / P)
                  for t, j in order])
    row_of = {o: i for i, o in enumerate(order)}
    # forward, stage B: each coefficient row of F (cos k / -sin k, k >= 1 for cos after the DC drop)
    coef = [("c", k) for k in range(1, cut)] + [("s", k) for k in range(1, cut) if 2 * k != L]
    groups: dict[int, list[int]] = {g: [] for g in range(P // 2 + 1)}
    for i, (_, k) in enumerate(coef):
        j = k % P
        groups[min(j, P - j)].append(i)
    nvec = -(-max(len(v) for v in groups.values()) // 16)
    Bc = np.zeros((P // 2 + 1, 2 * Q, nvec * 16))
    pos = np.full((P // 2 + 1, nvec * 16), -1, np.int32)
    r = np.arange(Q)
    for g, members in groups.items():
        for lane, i in enumerate(members):
            typ, k = coef[i]
            j = k % P
            sigma = 1.0 if j <= P // 2 else -1.0
            th = 2 * np.pi * k * r / L
            if typ == "c":                    # Re X[k] = sum_r cos(th) a_r + sin(th) b_r
                ca, cb = np.cos(th), sigma * np.sin(th)
            else:                             # Im X[k] = sum_r cos(th) b_r - sin(th) a_r
                ca, cb = -np.sin(th), sigma * np.cos(th)
            Bc[g, :Q, lane] = ca
            if g not in (0, P // 2):
                Bc[g, Q:, lane] = cb
            pos[g, lane] = i
    # the c row of group g must precede its s row in D (both adjacent): true by `order`
    assert all(row_of[("s", g)] == row_of[("c", g)] + 1 for g in range(1, P // 2))
    # inverse: recover u = Wr s + br c_scale rho from W's spectral rows, through inv's pseudo-inverse
    inv = inverse_basis(n, up, L)                                           # [n, 2up]
    pinv = np.linalg.pinv(inv).T            # [n, 2up]; the edge bins' imaginary columns are zero
    W64 = W.astype(np.float64)
    Uplain = W64[:R + 1] @ pinv                                              # [R+1, 2up]
    if not np.allclose(Uplain @ inv.T, W64[:R + 1], atol=tol * max(1.0, np.abs(W64[:R + 1]).max()), rtol=0) \
            or not np.allclose(W64[R + 1], 1.0, atol=tol):
        return None
    # order u by pairs of inverse bin groups (k mod P2 = j and P2 - j share the P2-point DFT's cosines and
    # negate its sines): [group 0], [group P2/2], [groups 1 and P2-1], ..., re and im of each bin k
    pairs = [[0], [P2 // 2]] + [[j, P2 - j] for j in range(1, P2 // 2)]
    kk_order, off, cnt, negate = [], [], [], []
    for groups_ in pairs:
        off.append(len(kk_order))
        for j in groups_:
            for k in (k for k in range(up) if k % P2 == j):
                kk_order += [k, up + k]
                negate += [j > P2 // 2] * 2
        cnt.append(len(kk_order) - off[-1])
    U = Uplain[:, kk_order]
    p = np.arange(Q2)
    T = np.zeros((2 * up, 2 * Q2))
    for row, kk in enumerate(kk_order):
        k, im = kk % up, kk >= up
        psi = 2 * np.pi * k * p / n
        # u is in inv's coordinates (y = inv @ u): T carries inv's weight alpha_k and its edge rule
        a = _alpha(k, n, L) if not (im and _edge(k, n)) else 0.0
        c, sn = a * np.cos(psi), a * np.sin(psi)
        re_part, im_part = (c, sn) if not im else (-sn, c)
        T[row, :Q2] = re_part                        # -> Z_re of the pair
        T[row, Q2:] = -im_part if negate[row] else im_part   # -> Z_im (P2 - j: its sines negated)
    # the P2-point inverse DFT on the pairs' rows: 0 -> cos 0, 1 -> cos(pi q), 2j / 2j+1 -> cos / -sin
    q = np.arange(P2)
    E = np.zeros((P2, P2))
    E[0], E[1] = 1.0, np.cos(np.pi * q)
    for j in range(1, P2 // 2):
        E[2 * j] = np.cos(2 * np.pi * j * q / P2)
        E[2 * j + 1] = -np.sin(2 * np.pi * j * q / P2)
    return SplitOperands(L, n, R, D, Bc, pos, U, T, E, tuple(off), tuple(cnt))


def split_operands_from_folded(M: np.ndarray, *, tol: float = 1e-5) -> SplitOperands | None:
    """The split form of the folded operand M [L + 2, n] (`gemm_operands(w, "folded")`), or None: the
    folded matrix is factored back into the low-rank form first. Its cut frequency is the highest DFT bin
    its rows hold, F the truncated basis without its DC row (a centred series has none), G the rows'
    coordinates in F (exact on centred series: F spans every bin up to the cut); `split_operands` then
    checks them. A matrix with every bin gives cut = L/2 + 1: still exact, just no faster."""
    L = M.shape[0] - 2
    if L < 2 or not split_applies(L, M.shape[1]):
        return None
    Mt = M[:L].astype(np.float64)                                            # [L, n]: M^T
    spec = np.abs(np.fft.rfft(Mt, axis=0))                                   # [L/2 + 1, n]
    energy = spec.max(axis=1)
    live = np.flatnonzero(energy > tol * max(float(energy.max()), 1e-30))
    cut = int(live.max()) + 1 if live.size else 1
    if cut < 2:
        return None
    basis, _ = forward_basis(L, cut)
    F = basis[1:]                                                            # [R, L]
    G = np.linalg.lstsq(F.T, Mt, rcond=None)[0]                              # [R, n]: Mt ~ F^T G (+ DC)
    W = np.concatenate([G, M[L:L + 2].astype(np.float64)])                   # [R + 2, n]
    return split_operands(F.T, W, tol=tol)


def _edge(k: int, n: int) -> bool:
    return k == 0 or 2 * k == n


def _alpha(k: int, n: int, seq_len: int) -> float:
    """inverse_basis's weight of bin k: 1/n (edge bins) or 2/n, times the n/L energy scale."""
    return (1.0 if _edge(k, n) else 2.0) / n * (n / seq_len)


def split_reference(xc: np.ndarray, rho: np.ndarray, mean: np.ndarray, s: SplitOperands) -> np.ndarray:
    """The split form stage by stage in NumPy (float64), for one centred series per column:
    xc [L, cols], rho / mean [cols] -> y [n, cols]; what the TVM kernel computes, in its order."""
    P, Q, Q2 = SPLIT, s.q, s.q2
    cols = xc.shape[1]
    Ar = s.D @ xc.reshape(P, Q * cols)                                       # [P, Q*cols]
    Ar = Ar.reshape(P, Q, cols)
    a = np.zeros((s.rank + 1, cols))
    for g in range(P // 2 + 1):
        row_c = 0 if g == 0 else 2 * g - 1
        inner = Ar[row_c:row_c + 2].reshape(2 * Q, cols) if g not in (0, P // 2) else Ar[row_c]
        out = s.Bc[g, :inner.shape[0]].T @ inner                             # [lanes, cols]
        for lane, i in enumerate(s.pos[g]):
            if i >= 0:
                a[i] = out[lane]
    a[s.rank] = rho
    u = s.U.T @ a                                                            # [2up, cols]
    Z = np.zeros((P, Q2, cols))
    for i, (o, c) in enumerate(zip(s.group_off, s.group_len)):
        part = s.T[o:o + c].T @ u[o:o + c]                                   # [2 * Q2, cols]
        if i < 2:
            Z[i] = part[:Q2]
        else:
            Z[2 * (i - 1)], Z[2 * (i - 1) + 1] = part[:Q2], part[Q2:]
    y = np.einsum("rq,rpc->qpc", s.E, Z)
    return y.reshape(P * Q2, cols) + mean
