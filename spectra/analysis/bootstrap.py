"""A seeded bootstrap confidence interval for the power-law alpha of an ESD (beyond
WeightWatcher, whose users ask for error bars; docs/methods.md section 2c).

Given a fit (xmin, xmax), the tail is the eigenvalues in `[xmin, xmax]` (n of them). Each of B
resamples draws n tail eigenvalues with replacement and refits the exponent with xmin held at
its fitted value, `alpha_b = 1 + n / sum ln(x_j / xmin)` (Clauset, Shalizi & Newman 2009, eq.
3.1); the interval is the percentile interval `[q_(1-level)/2, q_(1+level)/2]` of the alpha_b
(Efron & Tibshirani, "An Introduction to the Bootstrap", ch. 13). Conditional on xmin: a refit
of xmin per resample would cost a full KS search each (O(N^2)); the interval therefore reflects
the sampling error of the tail, not the choice of xmin. Seeded (numpy PCG64): same inputs, same
interval.
"""

from __future__ import annotations

import numpy as np

from spectra.errors import ValidationError

MAX_BLOCK = 2**22  # resample indices drawn per block (B x n), bounding memory


def bootstrap_alpha(
    evals: np.ndarray,
    xmin: float,
    xmax: float,
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """(low, high) percentile bootstrap interval of alpha over the tail [xmin, xmax] of
    `evals`; None when the tail has fewer than two distinct values."""
    if resamples < 2:
        raise ValidationError(f"resamples must be >= 2, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValidationError(f"level must be in (0, 1), got {level}")
    lam = np.asarray(evals, dtype=np.float64).ravel()
    tail = lam[(lam >= xmin) & (lam <= xmax)]
    if tail.size < 2 or not tail.max() > tail.min() or not xmin > 0:
        return None
    logs = np.log(tail / xmin)
    n = tail.size
    rng = np.random.default_rng(seed)
    alphas = np.empty(resamples, dtype=np.float64)
    rows = max(1, MAX_BLOCK // n)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        sums = logs[idx].sum(axis=1)
        with np.errstate(divide="ignore"):
            alphas[start:stop] = 1.0 + n / sums
    alphas = alphas[np.isfinite(alphas)]
    if alphas.size < 2:
        return None
    low, high = np.quantile(alphas, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)
