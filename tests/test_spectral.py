"""The FITS kernel: NumPy reference, folded-matrix reference and every ONNX lowering against PyTorch FITS.

Cases cover odd and even seq_len, pred_len 0 / odd / even (so odd and even totals L+H), cut_freq 1, small
and the largest the module accepts, shared and per-channel (`individual`) weights.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgeflex.kernels import spectral
from edgeflex.models.fits import FITS, cut_freq_for, dominant_period, spectral_weights

CHANNELS = 3
BATCH = 4


def max_cut(seq_len: int, pred_len: int) -> int:
    """The largest cut_freq FITS accepts for these lengths (asked of the module, not re-derived)."""
    for cut in range(seq_len // 2 + 1, 0, -1):
        try:
            FITS(seq_len, pred_len, 1, cut)
        except ValueError:
            continue
        return cut
    raise AssertionError(f"no cut_freq accepted for seq_len {seq_len}, pred_len {pred_len}")


def _cases() -> list[tuple[int, int, int, bool]]:
    cases = []
    for seq_len, pred_len, individual in itertools.product((24, 25), (0, 7, 8), (False, True)):
        for cut in sorted({1, 3, max_cut(seq_len, pred_len)}):
            cases.append((seq_len, pred_len, cut, individual))
    # a paper-like size: the ONNX DFT of a non-power-of-two length 120
    cases += [(96, 24, 9, False), (96, 24, max_cut(96, 24), True)]
    return cases


CASES = _cases()


def _id(case: tuple[int, int, int, bool]) -> str:
    seq_len, pred_len, cut, individual = case
    return f"L{seq_len}-H{pred_len}-cut{cut}-{'ind' if individual else 'shared'}"


@pytest.fixture(scope="module")
def case_data(make_fits):
    """case -> (x, torch FITS output, the module's weights); random, seeded by the case, built once."""

    @functools.cache
    def build(case: tuple[int, int, int, bool]) -> tuple[np.ndarray, np.ndarray, spectral.SpectralWeights]:
        seq_len, pred_len, cut, individual = case
        seed = seq_len * 1000 + pred_len * 100 + cut * 2 + individual
        model = make_fits(seq_len, pred_len, CHANNELS, cut, individual=individual, seed=seed)
        x = np.random.default_rng(seed).standard_normal((BATCH, seq_len, CHANNELS)).astype(np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        assert expected.shape == (BATCH, seq_len + pred_len, CHANNELS)
        return x, expected, spectral_weights(model)

    return build


def test_cases_cover_the_parities() -> None:
    assert {c[0] % 2 for c in CASES} == {0, 1}
    assert {c[1] % 2 for c in CASES if c[1]} == {0, 1} and any(c[1] == 0 for c in CASES)
    assert {(c[0] + c[1]) % 2 for c in CASES} == {0, 1}
    assert any(c[2] == 1 for c in CASES) and any(c[2] == c[0] // 2 + 1 for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_reference_matches_torch(case, case_data) -> None:
    x, expected, w = case_data(case)
    np.testing.assert_allclose(spectral.reference(x, w), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matrix_reference_matches_torch(case, case_data) -> None:
    x, expected, w = case_data(case)
    np.testing.assert_allclose(spectral.matrix_reference(x, w), expected, rtol=0, atol=1e-5)


def _run_form(w: spectral.SpectralWeights, form: str, x: np.ndarray) -> np.ndarray:
    model = spectral.to_onnx(w, form, channels=CHANNELS)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x})
    return y


@pytest.mark.parametrize("form", spectral.FORMS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_onnx_form_matches_torch(case, form: str, case_data) -> None:
    x, expected, w = case_data(case)
    y = _run_form(w, form, x)
    assert y.shape == expected.shape and y.dtype == np.float32
    if form == "dft":
        # NOTE: the `dft` form runs ONNX Runtime's own float32 DFT (twiddles in float32; lengths that are not
        # powers of two go through Bluestein's chirp-z, i.e. three padded FFTs), so rounding grows with the
        # transform length. The other forms are float64-precomputed matrices rounded once to float32.
        # Measured worst here: ~1.7e-5 of max|y| (L=96, L+H=120); the bound leaves ~10x margin.
        err = np.max(np.abs(y - expected)) / np.max(np.abs(expected))
        assert err <= 2e-4, f"dft form relative error {err:.3g}"
    else:
        np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("individual", [False, True])
def test_onnx_batch_is_dynamic(individual: bool, case_data) -> None:
    x, expected, w = case_data((25, 7, 3, individual))
    for form in spectral.FORMS:
        model = spectral.to_onnx(w, form, channels=CHANNELS)
        dims = model.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [25, CHANNELS]
        np.testing.assert_allclose(_run_form(w, form, x[:1]), expected[:1], rtol=0, atol=2e-4)


def test_to_onnx_rejects_unknown_form_and_wrong_channels(case_data) -> None:
    _, _, w = case_data((24, 8, 3, True))
    with pytest.raises(ValueError, match="unknown spectral form"):
        spectral.to_onnx(w, "fft", channels=CHANNELS)
    with pytest.raises(ValueError, match="channels"):
        spectral.to_onnx(w, "folded", channels=CHANNELS + 1)


@pytest.mark.parametrize("seq_len", [24, 25])
def test_fits_rejects_cut_freq_out_of_range(seq_len: int) -> None:
    for cut in (0, -1, seq_len // 2 + 2):
        with pytest.raises(ValueError, match="cut_freq"):
            FITS(seq_len, 0, 2, cut)
    # in range for the input, but the upsampled spectrum would not fit the output length
    with pytest.raises(ValueError, match="cut_freq"):
        FITS(seq_len, 2 * seq_len, 2, seq_len // 2 + 1)
    FITS(seq_len, 0, 2, seq_len // 2 + 1)


def test_spectral_weights_check_rejects_out_of_range_cut(case_data) -> None:
    _, _, w = case_data((24, 0, 3, False))
    bad = spectral.SpectralWeights(4, 0, np.ones((3, 4), np.complex64), np.ones(3, np.complex64))
    with pytest.raises(ValueError, match="cut_freq"):
        bad.check()
    w.check()


def test_cut_freq_for_matches_the_paper() -> None:
    assert cut_freq_for(360, 24, 6) == 106
    assert cut_freq_for(720, 24, 6) == 196
    assert cut_freq_for(48, 24, 50) == 25          # capped at the rfft length
    with pytest.raises(ValueError):
        cut_freq_for(96, 0, 2)


@pytest.mark.parametrize("period", [7, 24, 50])
def test_dominant_period_of_a_sine(period: int, rng: np.random.Generator) -> None:
    t = np.arange(period * 12)
    series = 3.0 + np.sin(2 * np.pi * t / period) + 0.3 * np.sin(2 * np.pi * t * 3 / period)
    series += 0.1 * rng.standard_normal(len(t))
    assert dominant_period(series) == period
    columns = np.stack([series, 2 * np.sin(2 * np.pi * t / period + 1.0)], axis=1)
    assert dominant_period(columns) == period


def test_macs_folded_exceeds_lowrank_for_small_cut(make_fits) -> None:
    model = make_fits(96, 24, 1, 4)
    w = spectral_weights(model)
    assert spectral.macs(w, "folded") == 120 * 96
    assert spectral.macs(w, "folded") > spectral.macs(w, "lowrank") > 0
    assert spectral.macs(w, "dft") > 0
    with pytest.raises(ValueError, match="unknown spectral form"):
        spectral.macs(w, "fft")


# --- SpectralMap: the form of a FITS known only by its probed map (export/spectral_match.py) ------------

@pytest.mark.parametrize("form", spectral.FORMS_OF_MAP)
@pytest.mark.parametrize("case", [c for c in CASES if c[1]], ids=_id)
def test_a_map_gives_the_forms_of_its_weights_and_the_centred_output(case, form: str, case_data) -> None:
    x, expected, w = case_data(case)
    m = spectral.SpectralMap.of(w)
    assert spectral.macs(m, form) == spectral.macs(w, form) or form == "lowrank"     # lowrank: bins M uses
    model = spectral.to_onnx(m, form, channels=CHANNELS, outputs=[("y", "y"), ("yc", "centred")])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, yc = sess.run(None, {"x": x})
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(yc, expected - x.mean(axis=1, keepdims=True), rtol=0, atol=2e-5)


def test_a_map_with_a_biased_variance_normalises_by_it() -> None:
    rng = np.random.default_rng(0)
    L, n = 20, 26
    M, c = rng.standard_normal((n, L)) * 0.1, rng.standard_normal(n) * 0.1
    x = (rng.standard_normal((3, L, 2)) * 3 + 1).astype(np.float32)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=1, keepdims=True)
    std = np.sqrt((x64 - mean).var(axis=1, keepdims=True) + 1e-5)      # ddof 0
    want = np.einsum("nl,blc->bnc", M, (x64 - mean) / std) * std + c[None, :, None] * std + mean
    for form in spectral.FORMS_OF_MAP:
        model = spectral.to_onnx(spectral.SpectralMap(L, n, M, c, 1e-5, ddof=0), form)
        (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x})
        np.testing.assert_allclose(y, want, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="unknown spectral form 'dft'"):
        spectral.to_onnx(spectral.SpectralMap(L, n, M, c), "dft")


def test_dominant_period_within_a_window_skips_a_drift_and_a_trend(rng: np.random.Generator) -> None:
    # a slow drift dominates the whole spectrum (as on ETTh1's training rows); FITS sees only `lookback` steps
    t = np.arange(3000)
    daily = np.sin(2 * np.pi * t / 24) + 0.1 * rng.standard_normal(len(t))
    drift = daily + 5 * np.sin(2 * np.pi * t / 1500)
    assert dominant_period(drift) == 1500
    assert dominant_period(drift, max_period=96) == 24
    trend = daily + 0.01 * t                # a line's spectrum swamps the first frequencies a window allows
    assert dominant_period(trend) == dominant_period(trend, max_period=96) == 24
    assert dominant_period(trend, max_period=1) == 1        # no period that short: the longest allowed
