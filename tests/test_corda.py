"""CorDA (arXiv 2406.05223): decomposition, damping, IPM/KPM, and the PEFT export on MiniLM."""

from __future__ import annotations

import pytest
import torch
from _adapt_fixtures import one_thread  # noqa: F401

from spectra.adapt.corda import corda_decompose, corda_factors, damped_inverse
from spectra.adapt.registry import InitContext, get_initializer
from spectra.adapt.stats import CalibrationStats
from spectra.errors import NumericalError, ValidationError


def _layer(out: int = 12, inp: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    L = torch.randn(inp, inp, generator=g, dtype=torch.float64)
    C = L @ L.T / inp + 0.1 * torch.eye(inp, dtype=torch.float64)  # known, well conditioned
    return W, C


def test_decomposition_reconstructs_w_in_float64():
    W, C = _layer()
    dec = corda_decompose(W, C)
    torch.testing.assert_close(dec.U @ torch.diag(dec.S) @ dec.Vp.T, W, rtol=0, atol=1e-10)
    assert dec.damp == 0.01 and dec.inverse_error < 1e-10
    # The singular values are those of W (C + 0.01 mean(diag C) I), descending.
    C_d = C + 0.01 * C.diagonal().mean() * torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(dec.S, torch.linalg.svdvals(W @ C_d), rtol=1e-12, atol=0)


def test_wide_matrix_reconstructs_too():
    W, C = _layer(out=5, inp=9, seed=3)
    dec = corda_decompose(W, C)
    assert dec.Vp.shape == (9, 5)
    torch.testing.assert_close(dec.U @ torch.diag(dec.S) @ dec.Vp.T, W, rtol=0, atol=1e-10)


def _needs_one_doubling(offset: float) -> torch.Tensor:
    """A symmetric 6 x 6 ``C`` with eigenvalues 1 (x5) and lam < 0 chosen so that the first
    damped matrix ``C + 0.01 mean(diag C) I`` is singular (offset 0) or nearly so; at d = 0.02
    its eigenvalues are >= |lam| > 0. (A PSD C never needs doubling: damping bounds its
    condition number by 1 + 100 n, harmless in float64. Slightly indefinite sums are what
    makes real statistics need it.)"""
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    lam = -0.05 / 6.01 * (1 + offset)  # lam + 0.01 * (5 + lam) / 6 = 0 at offset 0
    C = Q @ torch.diag(torch.tensor([1.0] * 5 + [lam], dtype=torch.float64)) @ Q.T
    return (C + C.T) / 2


@pytest.mark.parametrize("offset", [0.0, 1e-13])
def test_damping_doubles_on_a_singular_covariance(offset: float) -> None:
    C = _needs_one_doubling(offset)
    eye = torch.eye(6, dtype=torch.float64)
    first = C + 0.01 * C.diagonal().mean() * eye
    inv, info = torch.linalg.inv_ex(first)  # the first damping does not make C invertible
    assert int(info) > 0 or float(torch.linalg.matrix_norm(first @ inv - eye)) >= 0.05
    C_d, inv, damp, err = damped_inverse(C)
    assert damp == 0.02  # one doubling, no more
    assert err < 0.05
    assert float(torch.linalg.matrix_norm(C_d @ inv - eye)) == pytest.approx(err)
    torch.testing.assert_close(C_d, C + damp * C.diagonal().mean() * eye)


def test_damping_gives_up_after_max_doublings(monkeypatch: pytest.MonkeyPatch) -> None:
    import spectra.adapt.corda as corda

    monkeypatch.setattr(corda, "MAX_DOUBLINGS", 1)  # the covariance needs two tries
    with pytest.raises(NumericalError, match=r"after 1 doublings.*d = 0.01.*recompute"):
        damped_inverse(_needs_one_doubling(1e-13))
    monkeypatch.setattr(corda, "MAX_DOUBLINGS", 2)
    assert damped_inverse(_needs_one_doubling(1e-13))[2] == 0.02


def test_damping_refuses_degenerate_covariances():
    with pytest.raises(NumericalError, match="zero inputs"):
        damped_inverse(torch.zeros(4, 4))
    with pytest.raises(NumericalError, match="mean diagonal of -0.5 <= 0, so it is no covariance"):
        damped_inverse(torch.diag(torch.tensor([1.0, -2.0])))
    bad = torch.eye(3)
    bad[0, 1] = float("nan")
    with pytest.raises(NumericalError, match="NaN/Inf"):
        damped_inverse(bad)
    with pytest.raises(ValidationError, match=r"covariance \(3, 3\) does not match W \(4, 5\)"):
        corda_decompose(torch.zeros(4, 5), torch.eye(3))


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_ipm_keeps_the_largest_and_kpm_the_smallest_components(scale):
    W, C = _layer(seed=2)
    r = 3
    C_d = C + 0.01 * C.diagonal().mean() * torch.eye(8, dtype=torch.float64)
    S_ref = torch.linalg.svdvals(W @ C_d)  # independent float64 reference
    A, B, info = corda_factors(W, C, r, scale, "ipm")
    assert A.shape == (r, 8) and B.shape == (12, r)
    # (s B A) C_d is the best rank-r approximation of W C_d: its values are the top r ...
    torch.testing.assert_close(torch.linalg.svdvals(scale * B @ A @ C_d)[:r], S_ref[:r])
    # ... and what is left has the remaining ones (Eckart-Young).
    torch.testing.assert_close(torch.linalg.svdvals((W - scale * B @ A) @ C_d)[: 8 - r], S_ref[r:])
    assert info["sigma_kept"] == pytest.approx([float(S_ref[0]), float(S_ref[r - 1])])
    A, B, info = corda_factors(W, C, r, scale, "kpm")
    torch.testing.assert_close(torch.linalg.svdvals(scale * B @ A @ C_d)[:r], S_ref[-r:])
    assert info["sigma_kept"] == pytest.approx([float(S_ref[-r]), float(S_ref[-1])])
    # The factors share sqrt(S / s) evenly (PiSSA convention): ||B_i|| = sqrt(S_i / s).
    torch.testing.assert_close(B.norm(dim=0), (S_ref[-r:] / scale).sqrt())


def test_registered_initializers_read_calibration_stats():
    W, C = _layer(seed=4)
    stats = CalibrationStats(covariances={"lin": C}, counts={"lin": 100}, shared={"lin2": "lin"})
    ipm = get_initializer("corda-ipm")
    assert ipm.mutates_base and ipm.needs_calibration
    f = ipm.init(W.float(), 2, 1.0, InitContext(key="lin2.weight", module="lin2", stats=stats))
    A, B, _ = corda_factors(W, C, 2, 1.0, "ipm")
    torch.testing.assert_close(f.B @ f.A, (B @ A).float(), rtol=1e-5, atol=1e-5)
    assert f.info["mode"] == "ipm"
    kpm = get_initializer("corda-kpm")
    with pytest.raises(ValidationError, match="CorDA needs the input covariance of other"):
        kpm.init(W.float(), 2, 1.0, InitContext(key="other.weight", module="other"))
    with pytest.raises(ValidationError, match="CorDA mode must be 'ipm' or 'kpm', got 'x'"):
        corda_factors(W, C, 2, 1.0, "x")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"rank 9 must be in \[1, 8\]"):
        corda_factors(W, C, 9, 1.0)


@pytest.mark.slow
def test_peft_loads_export_on_residual_base_and_output_is_unchanged(minilm_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    from spectra.adapt.calib_collect import CalibrationOptions, calibrate
    from spectra.adapt.calib_data import load_texts
    from spectra.jobs.init import InitOptions, init_adapter

    targets = r"re:encoder\.layer\.0\.(attention\.self\.(query|value)|output\.dense)$"
    weights = [
        f"encoder.layer.{i}.{name}.weight"
        for i in (0,)
        for name in ("attention.self.query", "attention.self.value", "output.dense")
    ]
    texts = load_texts(None, samples=12)
    stats, mapping = calibrate(
        minilm_path, texts, weights, CalibrationOptions(batch_size=4, covariance=True), device="cpu"
    )
    result = init_adapter(
        minilm_path,
        InitOptions(
            out=tmp_path / "out", method="corda-kpm", rank=4, alpha=8, targets=targets, device="cpu"
        ),
        stats=dict.fromkeys(mapping.values(), stats),
    )
    assert sorted(m.module for m in result.plan.modules) == sorted(mapping.values())
    tok = AutoTokenizer.from_pretrained(minilm_path)
    enc = tok(texts[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = AutoModel.from_pretrained(minilm_path).eval()(**enc).last_hidden_state
        base = AutoModel.from_pretrained(result.residual_dir).eval()
        model = PeftModel.from_pretrained(base, result.adapter_dir).eval()
        got = model(**enc).last_hidden_state
    assert float((ref - got).abs().max()) <= 1e-4
    # The adapter is not trivial: without it the residual base gives a different output.
    with torch.no_grad(), model.disable_adapter():
        bare = model(**enc).last_hidden_state
    assert float((ref - bare).abs().max()) > 1e-3


def test_shared_covariance_inverse_is_reused_and_released():
    W, C = _layer(seed=5)
    ipm = get_initializer("corda-ipm")
    stats = CalibrationStats(covariances={"q": C}, shared={"k": "q"})
    ipm.init(W.float(), 2, 1.0, InitContext(key="q.weight", module="q", stats=stats))
    memo = ipm._memo
    assert memo is not None and memo[0]() is C
    f = ipm.init(W.float(), 2, 1.0, InitContext(key="k.weight", module="k", stats=stats))
    assert ipm._memo is memo  # same covariance object: no second inversion
    A, B, _ = corda_factors(W, C, 2, 1.0, "ipm")
    torch.testing.assert_close(f.B @ f.A, (B @ A).float(), rtol=1e-5, atol=1e-5)
    del stats, C
    import gc

    gc.collect()
    assert ipm._memo is None  # dropped together with the statistics
