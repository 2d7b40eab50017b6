"""Marchenko-Pastur bulk edge and spike count of an ESD, from a cheap quantile fit of sigma.

Model (Marchenko & Pastur 1967; Martin & Mahoney, arXiv 1810.01075): the eigenvalues of
`W^T W` of an N x M random matrix (N >= M, Q = N / M), rescaled to mean 1, follow the MP law of
variance sigma^2 on `[sigma^2 (1 - 1/sqrt(Q))^2, sigma^2 (1 + 1/sqrt(Q))^2]`. Spikes (learned
directions) sit above the bulk edge `lambda_+ = sigma^2 (1 + 1/sqrt(Q))^2`.

Estimator of sigma (ours; WeightWatcher fits a kernel density by brute-force search over sigma,
~12x its default analysis on MiniLM): the MP law scales with sigma^2, so its quantiles are
`sigma^2 * q_1(p)` where `q_1` is the quantile function at sigma = 1. We match the empirical
quantiles of the rescaled ESD at levels `p = 0.05, 0.10, ..., 0.50` (the lower half, which a few
spikes barely move) by least squares: `sigma^2 = sum(q_emp q_1) / sum(q_1^2)`. `q_1` comes from
the MP CDF on a 4096-point grid (cached per Q): O(grid + M log M) per matrix, no Python loop per
eigenvalue. A spike is an eigenvalue above `lambda_+` plus, by default, WeightWatcher's
Tracy-Widom margin `sqrt(Q^(-1/2) lambda_+^(2/3) M^(-2/3))` (in the rescaled units).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from spectra.analysis.results import json_safe
from spectra.errors import ValidationError

QUANTILE_LEVELS = np.linspace(0.05, 0.5, 10)  # lower half of the bulk: robust to spikes
_GRID = 4096


@dataclass(frozen=True)
class MPFit:
    """MP fit of one ESD. bulk_max is in the ESD's own units (lambda = S^2, not rescaled), so
    it can be drawn on the ESD; sigma and bulk_max_rescaled are in the mean-1 units; softrank is
    WeightWatcher's mp_softrank, bulk_max / lambda_max."""

    sigma: float
    bulk_max: float
    bulk_max_rescaled: float
    num_spikes: int
    Q: float
    tracy_widom: bool
    softrank: float | None = None  # mp_softrank = bulk edge / largest eigenvalue (both rescaled)

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


@lru_cache(maxsize=64)
def mp_quantiles(q_ratio: float, levels: tuple[float, ...]) -> np.ndarray:
    """Quantiles of the MP law with sigma = 1 and aspect ratio Q = N / M >= 1 at `levels`.

    The CDF is integrated on a grid `x = a + (b - a)(1 - cos(pi t)) / 2`, which makes the
    integrand smooth at both edges (also at a = 0 when Q = 1).
    """
    y = 1.0 / q_ratio
    a = (1.0 - np.sqrt(y)) ** 2
    b = (1.0 + np.sqrt(y)) ** 2
    t = np.linspace(0.0, 1.0, _GRID)
    x = a + (b - a) * (1.0 - np.cos(np.pi * t)) / 2.0
    dx_dt = (b - a) * np.pi / 2.0 * np.sin(np.pi * t)
    root = (b - a) / 2.0 * np.sin(np.pi * t)  # sqrt((b - x)(x - a)) in the t variable
    with np.errstate(divide="ignore", invalid="ignore"):
        dens = np.where(x > 0, root / (2.0 * np.pi * y * x), 0.0) * dx_dt
    if a == 0.0:  # Q = 1: root * dx_dt / x -> b as t -> 0
        dens[0] = b / (2.0 * np.pi * y)
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2.0 * np.diff(t))])
    cdf /= cdf[-1]
    return np.interp(np.asarray(levels), cdf, x)


def mp_fit(evals: np.ndarray, shape: tuple[int, int], *, tracy_widom: bool = True) -> MPFit | None:
    """Fit the MP bulk to the ESD `evals` (M,) of a matrix of `shape` (m, n); None if empty.

    Returns MPFit with sigma (quantile least squares, module docstring), the bulk edge in
    original and rescaled units, and the number of eigenvalues above the edge (+ TW margin).
    """
    m, n = (int(s) for s in shape)
    if m < 1 or n < 1:
        raise ValidationError(f"shape must be two positive sizes, got {shape}")
    lam = np.asarray(evals, dtype=np.float64).ravel()
    total = float(lam.sum()) if lam.size else 0.0
    if lam.size == 0 or not np.isfinite(total) or total <= 0.0:
        return None
    big_n, big_m = max(m, n), min(m, n)
    q_ratio = big_n / big_m
    scale = lam.size / total  # rescale to mean 1 (WeightWatcher's Wscale^2)
    x = np.sort(lam * scale)
    q1 = mp_quantiles(q_ratio, tuple(QUANTILE_LEVELS))
    qe = np.quantile(x, QUANTILE_LEVELS)
    sigma2 = float(np.dot(qe, q1) / np.dot(q1, q1))
    edge = sigma2 * (1.0 + 1.0 / np.sqrt(q_ratio)) ** 2
    cut = edge
    if tracy_widom:
        cut = edge + np.sqrt(q_ratio**-0.5 * edge ** (2.0 / 3.0) * big_m ** (-2.0 / 3.0))
    spikes = int(x.size - np.searchsorted(x, cut, side="right"))
    return MPFit(
        sigma=float(np.sqrt(sigma2)),
        bulk_max=float(edge / scale),
        bulk_max_rescaled=float(edge),
        num_spikes=spikes,
        Q=float(q_ratio),
        tracy_widom=tracy_widom,
        softrank=float(edge / x[-1]),
    )
