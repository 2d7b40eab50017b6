"""WeightWatcher 0.7.7's Marchenko-Pastur fit: sigma by brute-force search of a KDE residual.

The compatible alternative to the quantile estimator of mp.py (docs/methods.md section 2, "MP
fits"), for users who need WeightWatcher's `num_spikes`, `sigma_mp` and `mp_softrank` numbers.
Definitions (WeightWatcher's `mp_fit` / `fit_density_with_range` / `resid_mp`; Martin & Mahoney,
arXiv 1810.01075):

1. rescale the ESD to mean 1: `x = lambda * M / sum(lambda)`; Q = N / M;
2. the fitted sample is `x` (Q > 1) or `sqrt(x)` (Q = 1, the quarter-circle law of singular
   values); its density is a linear-kernel KDE, bandwidth 0.1,
   `f(t) = 1/(n h) sum_i max(0, 1 - |t - s_i| / h)`, on 1000 points `t = linspace(0, max + 0.5)`;
   points with `f < 0.01` are dropped (they add 0 to the residual);
3. the residual of a sigma is `sum (rho_sigma(t) - f(t))^2` with rho the MP density
   `sqrt((b - t)(t - a)) / (2 pi sigma^2 t / Q)` (Q > 1; 1000 per point when the MP support
   `[a, b]` misses the KDE's peak or ends beyond the last kept point) or the quarter circle
   `sqrt(4 - t^2) / (pi sigma^2)` (Q = 1); not-a-number densities count as 0;
4. sigma minimizes it over the grid `arange(0.05 s0, 2 s0, 0.01 s0)`, `s0 = sqrt(max(x)) /
   (1 + Q^-1/2)`, polished by Nelder-Mead (scipy.optimize.brute with its default fmin finish);
5. bulk edge `lambda_+ = (sigma (1 + Q^-1/2))^2`, spikes: `x > lambda_+ + sqrt(Q^-1/2
   lambda_+^(2/3) M^(-2/3))` (Tracy-Widom margin), `mp_softrank = lambda_+ / max(x)`.

WeightWatcher evaluates the KDE anew for every sigma (sklearn); it does not depend on sigma, so
here it is evaluated once: ~1000 x M operations, then ~220 cheap residuals.
"""

from __future__ import annotations

import numpy as np

from spectra.analysis.mp import MPFit
from spectra.errors import ValidationError

BANDWIDTH = 0.1
GRID_POINTS = 1000
DENSITY_FLOOR = 0.01  # KDE points below this are dropped from the residual
OUT_OF_SUPPORT = 1000.0  # residual per point of a sigma whose MP support misses the KDE


def linear_kde(sample: np.ndarray, points: np.ndarray, bandwidth: float = BANDWIDTH) -> np.ndarray:
    """Linear-kernel density estimate of `sample` (n,) at `points` (k,): (k,).

    Evaluated in blocks of points so memory stays O(block x n).
    """
    out = np.empty(points.size, dtype=np.float64)
    step = max(1, 2**22 // max(sample.size, 1))
    for start in range(0, points.size, step):
        block = points[start : start + step, None] - sample[None, :]
        np.abs(block, out=block)
        block *= -1.0 / bandwidth
        block += 1.0
        np.maximum(block, 0.0, out=block)
        out[start : start + step] = block.sum(axis=1)
    return out / (sample.size * bandwidth)


class _Residual:
    """The residual of step 3 as a function of sigma, with the KDE evaluated once."""

    def __init__(self, sample: np.ndarray, q_ratio: float) -> None:
        grid = np.linspace(0.0, float(np.max(sample)) + 0.5, GRID_POINTS)
        dens = linear_kde(sample, grid)
        keep = dens > DENSITY_FLOOR
        self.t, self.f, self.q = grid[keep], dens[keep], q_ratio
        self.peak = float(self.t[int(np.argmax(self.f))]) if self.t.size else 0.0
        self.last = float(np.max(self.t)) if self.t.size else 0.0

    def __call__(self, sigma: float | np.ndarray) -> float:
        s = float(np.asarray(sigma, dtype=np.float64).ravel()[0])
        t = self.t
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if self.q == 1.0:
                rho = np.nan_to_num(np.sqrt(4.0 - t**2) / (np.pi * s * s))
            else:
                y = 1.0 / self.q
                b = (s * (1.0 + np.sqrt(y))) ** 2
                a = (s * (1.0 - np.sqrt(y))) ** 2
                if b < self.peak or b > self.last or a > self.peak:
                    return float(OUT_OF_SUPPORT**2 * t.size)
                rho = np.nan_to_num(np.sqrt((b - t) * (t - a)) / (2.0 * np.pi * s * s * t * y))
        return float(np.sum((rho - self.f) ** 2))


def mp_fit_kde(
    evals: np.ndarray, shape: tuple[int, int], *, tracy_widom: bool = True
) -> MPFit | None:
    """WeightWatcher's MP fit (module docstring) of the ESD `evals` (M,) of a `shape` matrix.

    Returns an MPFit (sigma, bulk edge in original and rescaled units, spikes, softrank), or
    None for an empty, all-zero or non-finite spectrum.
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
    scale = lam.size / total
    x = np.sort(lam * scale)
    lmax = float(x[-1])
    s0 = float(np.sqrt(lmax / (1.0 + 1.0 / np.sqrt(q_ratio)) ** 2))
    sample = np.sqrt(x) if q_ratio == 1.0 else x
    residual = _Residual(sample, q_ratio)
    grid = (slice(0.05 * s0, 2.0 * s0, 0.01 * s0),)
    # imported here; scipy.optimize is ~0.4 s of CPU that a default report (quantile MP fit,
    # or none) would otherwise pay at start-up
    from scipy import optimize

    best = optimize.brute(residual, grid, full_output=True, finish=optimize.fmin)
    sigma = float(np.atleast_1d(best[0])[0])
    edge = (sigma * (1.0 + 1.0 / np.sqrt(q_ratio))) ** 2
    cut = edge
    if tracy_widom:
        cut = edge + np.sqrt(q_ratio**-0.5 * edge ** (2.0 / 3.0) * big_m ** (-2.0 / 3.0))
    return MPFit(
        sigma=sigma,
        bulk_max=float(edge / scale),
        bulk_max_rescaled=float(edge),
        num_spikes=int(np.count_nonzero(x > cut)),
        Q=float(q_ratio),
        tracy_widom=tracy_widom,
        softrank=float(edge / lmax),
    )
