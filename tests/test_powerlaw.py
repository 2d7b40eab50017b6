"""The vectorized power-law fit against a plain float64 loop written from the definition."""

from __future__ import annotations

import numpy as np
import pytest

from spectra.analysis.powerlaw import candidate_fits, fit_powerlaw
from spectra.errors import ValidationError


def reference_fit(evals: np.ndarray, thresh: float = 1e-5) -> tuple[float, float, float, int]:
    """methods.md section 2, one candidate at a time: (alpha, xmin, D, n)."""
    data = np.sort(np.asarray(evals, dtype=np.float64))
    data = data[data > thresh]
    best = (np.inf, 0.0, 0.0, 0)
    for i in range(data.size - 1):
        xmin = data[i]
        tail = data[i:]
        n = tail.size
        alpha = 1.0 + n / np.sum(np.log(tail / xmin))
        f_emp = np.arange(n) / n
        f_fit = 1.0 - (tail / xmin) ** (1.0 - alpha)
        d = np.max(np.abs(f_emp - f_fit))
        if d < best[0]:
            best = (d, alpha, xmin, n)
    d, alpha, xmin, n = best
    return alpha, xmin, d, n


def _gram_esd(rng: np.random.Generator, m: int, n: int, heavy: bool) -> np.ndarray:
    w = rng.standard_t(3, size=(m, n)) if heavy else rng.standard_normal((m, n))
    return np.linalg.svd(w, compute_uv=False) ** 2


ESDS = {
    "pareto": lambda rng: rng.pareto(1.5, 300) + 1.0,
    "gaussian-gram": lambda rng: _gram_esd(rng, 200, 120, heavy=False),
    "student-gram": lambda rng: _gram_esd(rng, 150, 150, heavy=True),
    "lognormal": lambda rng: rng.lognormal(0.0, 2.0, 257),
}


@pytest.mark.parametrize("kind", sorted(ESDS))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_float64_reference_loop(kind: str, seed: int) -> None:
    evals = ESDS[kind](np.random.default_rng(seed))
    alpha, xmin, d, n = reference_fit(evals)
    fit = fit_powerlaw(evals)
    assert fit.status == "ok"
    assert fit.alpha == pytest.approx(alpha, rel=1e-10)
    assert fit.xmin == xmin
    assert fit.D == pytest.approx(d, rel=1e-10, abs=1e-14)
    assert fit.num_spikes == n
    assert fit.sigma == pytest.approx((alpha - 1.0) / np.sqrt(n), rel=1e-10)
    assert fit.xmax == np.max(evals)


def test_chunking_does_not_change_results() -> None:
    evals = _gram_esd(np.random.default_rng(3), 300, 200, heavy=True)
    data = np.sort(evals)
    a_big, d_big = candidate_fits(data)
    a_one, d_one = candidate_fits(data, max_chunk_bytes=8)  # one candidate per chunk
    a_mid, d_mid = candidate_fits(data, max_chunk_bytes=50_000)
    np.testing.assert_array_equal(a_big, a_one)
    np.testing.assert_array_equal(d_big, d_one)
    np.testing.assert_array_equal(d_big, d_mid)


def test_recovers_known_exponent() -> None:
    # Pareto(a) + 1 has density ~ x^-(a+1) above 1; CSN's estimate is within a few sigma.
    evals = np.random.default_rng(7).pareto(2.0, 5000) + 1.0
    fit = fit_powerlaw(evals)
    assert abs(fit.alpha - 3.0) < 4 * fit.sigma + 0.05


def test_threshold_is_strict_and_skip_below_eight() -> None:
    base = np.array([1e-5, 1e-6, 0.0] + [2.0, 3.0, 5.0, 7.0, 11.0, 13.0, 17.0])
    fit = fit_powerlaw(base)  # 7 left after dropping <= 1e-5
    assert fit.status == "skipped"
    assert fit.alpha is None and fit.D is None
    assert "7 eigenvalues" in fit.message
    fit8 = fit_powerlaw(np.append(base, 19.0))
    assert fit8.status == "ok"
    # the values at or below the cut take no part: same fit as without them
    assert fit8 == fit_powerlaw(np.array([2.0, 3.0, 5.0, 7.0, 11.0, 13.0, 17.0, 19.0]))


def test_non_finite_and_degenerate_fail() -> None:
    bad = np.array([1.0, 2.0, np.nan] + list(range(3, 12)), dtype=float)
    fit = fit_powerlaw(bad)
    assert fit.status == "failed" and "1 non-finite" in fit.message
    flat = fit_powerlaw(np.full(20, 3.0))
    assert flat.status == "failed"
    assert flat.alpha is None


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValidationError, match="min_evals must be >= 2, got 1"):
        fit_powerlaw(np.arange(1.0, 20.0), min_evals=1)
    with pytest.raises(ValidationError, match="max_chunk_bytes"):
        fit_powerlaw(np.arange(1.0, 20.0), max_chunk_bytes=0)


def test_to_dict_is_json_safe() -> None:
    fit = fit_powerlaw(np.random.default_rng(0).pareto(1.0, 50) + 1.0)
    d = fit.to_dict()
    assert d["status"] == "ok" and isinstance(d["alpha"], float)
    assert fit_powerlaw(np.ones(3)).to_dict()["alpha"] is None
