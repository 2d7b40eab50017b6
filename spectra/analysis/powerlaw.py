"""Clauset-Shalizi-Newman continuous power-law fit of an ESD, vectorized over every xmin.

Reference: A. Clauset, C. R. Shalizi, M. E. J. Newman, "Power-law distributions in empirical
data", SIAM Review 51 (2009). Conventions of WeightWatcher 0.7.x (methods.md section 2):

- eigenvalues `<= 1e-5` are dropped; fewer than 8 left -> status "skipped";
- candidates: every sorted eigenvalue but the largest; for candidate `xmin = x_(i)` the tail is
  `x_(i..N-1)`, `n = N - i`, `alpha = 1 + n / sum(ln(x_j / xmin))`;
- `D = max_j |j/n - (1 - (x_j / xmin)^(1 - alpha))|`, `j = 0..n-1` over the ascending tail (the
  one-sided empirical CDF of the `powerlaw` package, which WeightWatcher follows);
- the smallest D wins (first index on ties); `sigma = (alpha - 1) / sqrt(n)`.

WeightWatcher loops over candidates in Python; here the alphas come from one reversed cumulative
sum of log eigenvalues and the KS distances from chunked (candidates x tail) array blocks whose
size is bounded (`max_chunk_bytes`), so memory stays O(chunk) for any N.
"""

from __future__ import annotations

import numpy as np

from spectra.analysis.results import PowerLawFit
from spectra.errors import ValidationError

EVALS_THRESH = 1e-5  # eigenvalues <= this are dropped before fitting (WeightWatcher's cut)
MIN_EVALS = 8  # fewer eigenvalues than this left after the cut: the fit is skipped
DEFAULT_CHUNK_BYTES = 64 * 2**20  # bound on the (candidates x tail) float64 blocks of one chunk
_BLOCK_TEMPS = 2  # (c, w) float64 arrays alive at once in _ks_block


def fit_powerlaw(
    evals: np.ndarray,
    *,
    thresh: float = EVALS_THRESH,
    min_evals: int = MIN_EVALS,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> PowerLawFit:
    """Fit p(lambda) ~ lambda^-alpha to the tail of an ESD, xmin by minimum KS distance.

    evals: (M,) eigenvalues lambda = S^2, any order, any float dtype (computed in float64).
    Returns a PowerLawFit; status "skipped" when fewer than `min_evals` eigenvalues exceed
    `thresh`, "failed" when the input is not finite or no candidate gives a finite fit.

    >>> rng = np.random.default_rng(0)
    >>> fit = fit_powerlaw(rng.pareto(2.0, 2000) + 1.0)  # density exponent 3
    >>> fit.status, round(fit.alpha, 1)
    ('ok', 3.0)
    """
    x = np.asarray(evals, dtype=np.float64).ravel()
    if min_evals < 2:
        raise ValidationError(f"min_evals must be >= 2, got {min_evals}")
    if max_chunk_bytes < 8:
        raise ValidationError(f"max_chunk_bytes must be >= 8, got {max_chunk_bytes}")
    if not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        return _not_ok("failed", f"{bad} non-finite eigenvalues")
    data = np.sort(x[x > thresh])
    if data.size < min_evals:
        return _not_ok(
            "skipped", f"{data.size} eigenvalues > {thresh:g}, fewer than min_evals={min_evals}"
        )
    alphas, ds = candidate_fits(data, max_chunk_bytes=max_chunk_bytes)
    if not np.any(np.isfinite(ds) & (ds < 1.0)):
        return _not_ok("failed", "no xmin candidate gave a finite power law (degenerate ESD)")
    i = int(np.argmin(ds))
    n = data.size - i
    alpha = float(alphas[i])
    return PowerLawFit(
        alpha=alpha,
        xmin=float(data[i]),
        xmax=float(data[-1]),
        D=float(ds[i]),
        sigma=(alpha - 1.0) / float(np.sqrt(n)),
        num_spikes=int(n),
        status="ok",
        message="",
    )


def candidate_fits(
    data: np.ndarray, *, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """alpha and KS distance D for every xmin candidate of an ascending, positive `data` (N,).

    Returns (alphas, Ds), each (N - 1,): entry i is the fit with xmin = data[i]. A candidate
    whose alpha is not finite and > 1 gets D = 1 (never chosen unless all are so), as in
    WeightWatcher.
    """
    big_n = data.size
    log_x = np.log(data)  # (N,)
    tail_log_sum = np.cumsum(log_x[::-1])[::-1]  # (N,) sum_{j >= i} ln x_j
    idx = np.arange(big_n - 1)
    n = (big_n - idx).astype(np.float64)  # (N-1,) tail sizes
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + n / (tail_log_sum[:-1] - n * log_x[:-1])
    ds = np.ones(big_n - 1, dtype=np.float64)
    # a tail whose values all equal xmin has no exponent (cumsum rounding would invent one)
    valid = np.isfinite(alphas) & (alphas > 1.0) & (data[:-1] < data[-1])
    start = 0
    while start < big_n - 1:
        width = big_n - start  # columns: tail positions start..N-1
        rows = max(1, min(big_n - 1 - start, max_chunk_bytes // (_BLOCK_TEMPS * 8 * width)))
        stop = start + rows
        ds[start:stop] = _ks_block(log_x, alphas, start, stop)
        start = stop
    ds[~valid] = 1.0
    return alphas, ds


def _ks_block(log_x: np.ndarray, alphas: np.ndarray, start: int, stop: int) -> np.ndarray:
    """D for candidates start..stop-1: max over each tail of |F_emp - F_fit|, (stop-start,).

    With c = stop - start rows and w = N - start columns (absolute positions start..N-1):
    `1 - F_fit = exp((1 - alpha) ln(x_j / xmin))` and `F_emp - 1 = (j - N) / n`, so
    `F_emp - F_fit` is their sum. Two (c, w) float64 arrays live at once.
    """
    big_n = log_x.size
    inv_n = 1.0 / (big_n - np.arange(start, stop, dtype=np.float64))  # (c,) 1 / tail size
    expo = 1.0 - alphas[start:stop]  # (c,)
    with np.errstate(over="ignore", invalid="ignore"):
        block = log_x[None, start:] - log_x[start:stop, None]  # (c, w) ln(x_j / xmin)
        block *= expo[:, None]
        np.exp(block, out=block)  # (x_j / xmin)^(1 - alpha) = 1 - F_fit
        block += np.arange(start - big_n, 0, dtype=np.float64)[None, :] * inv_n[:, None]
        np.abs(block, out=block)  # |F_emp - F_fit|
    for r in range(1, stop - start):  # positions before candidate r are not in its tail
        block[r, :r] = 0.0
    return block.max(axis=1)


def _not_ok(status: str, message: str) -> PowerLawFit:
    return PowerLawFit(
        alpha=None,
        xmin=None,
        xmax=None,
        D=None,
        sigma=None,
        num_spikes=0,
        status=status,
        message=message,
    )
