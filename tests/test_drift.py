"""Update statistics and subspace drift against float64 full-SVD references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from spectra.analysis.drift import (
    energy_rank,
    left_singular,
    lowrank_update_svd,
    subspace_drift,
    update_stats,
)
from spectra.analysis.htsr import RANK_EPS, numerical_rank
from spectra.errors import NumericalError, ValidationError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("r", [1, 3, 7])
def test_exact_rank_r_update_is_reported_as_rank_r(r: int) -> None:
    g = _gen(r)
    m, n = 64, 48
    d_w = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(
        r, n, generator=g, dtype=torch.float64
    )
    # Pass through float32 the way stored checkpoints do: the rank must survive rounding.
    w0 = torch.randn(m, n, generator=g).to(torch.float64)
    w_ft = (w0 + 0.05 * d_w).to(torch.float32).to(torch.float64)
    s = torch.linalg.svdvals(w_ft - w0)
    st = update_stats(s, shape=(m, n), base_fro=float(w0.norm()), k=10)
    assert st.numerical_rank == r
    assert st.rank_tol == pytest.approx(float(s[0]) * max(m, n) * RANK_EPS)
    assert st.energy_rank <= r
    assert st.energy_topk == pytest.approx(1.0, abs=1e-9)


def test_stats_match_their_definitions() -> None:
    g = _gen(10)
    m, n = 20, 30
    w0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    d_w = torch.randn(m, n, generator=g, dtype=torch.float64) * 0.1
    s = torch.linalg.svdvals(d_w).numpy()
    st = update_stats(torch.from_numpy(s), shape=(m, n), base_fro=float(w0.norm()), k=5)
    p = s / s.sum()
    assert st.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert st.stable_rank == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-12)
    assert st.energy_topk == pytest.approx((s[:5] ** 2).sum() / (s**2).sum(), rel=1e-12)
    assert st.fro_norm == pytest.approx(float(d_w.norm()), rel=1e-12)
    assert st.spectral_norm == pytest.approx(float(np.linalg.norm(d_w.numpy(), 2)), rel=1e-12)
    assert st.rel_change == pytest.approx(float(d_w.norm() / w0.norm()), rel=1e-12)
    assert st.numerical_rank == m
    cum = np.cumsum(s**2) / (s**2).sum()
    assert st.energy_rank == int(np.argmax(cum >= 0.99)) + 1
    assert st.top_singular_values == tuple(s.tolist())


def test_zero_update() -> None:
    st = update_stats(torch.zeros(5, dtype=torch.float64), shape=(5, 8), base_fro=2.0, k=3)
    assert st.numerical_rank == 0 and st.energy_rank == 0 and st.effective_rank == 0.0
    assert st.rel_change == 0.0 and st.stable_rank is None and st.energy_topk is None
    assert numerical_rank(np.zeros(0), 3) == 0
    assert energy_rank(torch.zeros(3)) == 0


def test_update_rank_is_the_weight_matrix_rule_at_its_threshold() -> None:
    m, n = 40, 30
    tol = 2.0 * max(m, n) * RANK_EPS  # S_1 = 2
    s = torch.tensor([2.0, 1.0, tol * (1 + 1e-7), tol, tol * (1 - 1e-7), 0.0], dtype=torch.float64)
    st = update_stats(s, shape=(m, n), base_fro=1.0, k=2)
    assert st.numerical_rank == numerical_rank(s.numpy(), max(m, n)) == 3  # S_i > tol, strictly
    assert st.rank_tol == tol


@pytest.mark.parametrize("scale", [2.0, -0.5])
def test_lowrank_svd_from_factors_matches_dense(scale: float) -> None:
    g = _gen(11)
    m, n, r = 40, 24, 6
    a = torch.randn(r, n, generator=g, dtype=torch.float64)
    b = torch.randn(m, r, generator=g, dtype=torch.float64)
    u, s, vh = lowrank_update_svd(a.float(), b.float(), scale)
    d_w = scale * b.float().double() @ a.float().double()
    s_ref = torch.linalg.svdvals(d_w)
    torch.testing.assert_close(s, s_ref[:r], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, d_w, rtol=0, atol=1e-11)
    assert u.shape == (m, r) and vh.shape == (r, n)


def test_lowrank_svd_rejects_mismatched_factors() -> None:
    with pytest.raises(ValidationError, match=r"A \(4, 8\).*B \(6, 3\)"):
        lowrank_update_svd(torch.zeros(4, 8), torch.zeros(6, 3), 1.0)


def test_principal_angles_match_scipy() -> None:
    g = _gen(12)
    m, k = 30, 5
    ua = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    ub = torch.linalg.qr(ua + 0.3 * torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    drift = subspace_drift(ua, ub)
    ref = np.sort(np.cos(scipy.linalg.subspace_angles(ua.numpy(), ub.numpy())))[::-1]
    np.testing.assert_allclose(np.array(drift.cosines), ref, rtol=0, atol=1e-12)
    assert drift.min_cos == pytest.approx(ref.min())
    assert drift.angles_deg[0] == pytest.approx(math.degrees(math.acos(min(1.0, ref[0]))))
    same = subspace_drift(ua, ua @ torch.linalg.qr(torch.randn(k, k, generator=g).double())[0])
    assert same.min_cos == pytest.approx(1.0, abs=1e-12)


def test_left_singular_refuses_non_finite() -> None:
    w = torch.ones(3, 3)
    w[1, 1] = float("nan")
    with pytest.raises(NumericalError, match=r"\(3, 3\)"):
        left_singular(w)
