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

The search for the best candidate (`fit_powerlaw`) does not compute every D in full, which costs
N^2 / 2 exponentials (0.2-0.3 s for N = 4096): a max over a subset of a tail's points is a lower
bound on that candidate's D, and is made of the very float64 terms the full D takes its max
over. So a first pass takes every candidate's max over every `stride`-th position (N / stride
terms each), then candidates are computed in full in order of that bound until the next bound
exceeds the best full D found: no skipped candidate can have a smaller (or equal) D. The winner,
its D and the first-index rule on ties are those of the full search, bit for bit.
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
    alphas, valid = candidate_alphas(data)
    i, best = best_candidate(data, alphas, valid, max_chunk_bytes=max_chunk_bytes)
    if not best < 1.0:
        return _not_ok("failed", "no xmin candidate gave a finite power law (degenerate ESD)")
    n = data.size - i
    alpha = float(alphas[i])
    return PowerLawFit(
        alpha=alpha,
        xmin=float(data[i]),
        xmax=float(data[-1]),
        D=best,
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
    alphas, valid = candidate_alphas(data)
    ds = np.ones(big_n - 1, dtype=np.float64)
    start = 0
    while start < big_n - 1:
        width = big_n - start  # columns: tail positions start..N-1
        rows = max(1, min(big_n - 1 - start, max_chunk_bytes // (_BLOCK_TEMPS * 8 * width)))
        stop = start + rows
        ds[start:stop] = _ks_block(log_x, alphas, start, stop)
        start = stop
    ds[~valid] = 1.0
    return alphas, ds


def candidate_alphas(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MLE exponent for every xmin candidate of an ascending, positive `data` (N,), and which
    candidates have a usable one: ``(alphas (N - 1,), valid (N - 1,) bool)``.

    >>> alphas, valid = candidate_alphas(np.array([1.0, 2.0, 4.0]))
    >>> [round(float(a), 4) for a in alphas], valid.tolist()
    ([2.4427, 3.8854], [True, True])
    """
    big_n = data.size
    log_x = np.log(data)  # (N,)
    tail_log_sum = np.cumsum(log_x[::-1])[::-1]  # (N,) sum_{j >= i} ln x_j
    n = (big_n - np.arange(big_n - 1)).astype(np.float64)  # (N-1,) tail sizes
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + n / (tail_log_sum[:-1] - n * log_x[:-1])
    # a tail whose values all equal xmin has no exponent (cumsum rounding would invent one)
    valid = np.isfinite(alphas) & (alphas > 1.0) & (data[:-1] < data[-1])
    return alphas, valid


# Candidates up to this many are searched in full (the bound pass would not pay); above it the
# bound pass samples about BOUND_POINTS positions of every tail.
FULL_SEARCH_MAX = 256
BOUND_POINTS = 128
EXACT_STEP = 16  # candidates computed in full per step, lowest bounds first


def best_candidate(
    data: np.ndarray,
    alphas: np.ndarray,
    valid: np.ndarray,
    *,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[int, float]:
    """``(i, D_i)`` of the candidate with the smallest KS distance (first index on ties; invalid
    candidates count as D = 1), exactly as ``argmin`` over `candidate_fits`' Ds, without
    computing every D in full (module docstring). ``D >= 1`` means no usable candidate."""
    big_n = data.size
    log_x = np.log(data)
    if big_n - 1 <= FULL_SEARCH_MAX:
        ds = candidate_fits(data, max_chunk_bytes=max_chunk_bytes)[1]
        i = int(np.argmin(ds))
        return i, float(ds[i])
    stride = max(1, big_n // BOUND_POINTS)
    cols = np.arange(0, big_n, stride)
    rows = np.flatnonzero(valid)
    bound = np.empty(rows.size)
    for part in _chunks(rows, cols.size, max_chunk_bytes):
        bound[part] = _ks_rows(log_x, alphas, rows[part], cols)
    bound[np.isnan(bound)] = -np.inf  # no bound: compute in full
    order = np.argsort(bound, kind="stable")
    best_d, best_i = 1.0, 0  # D >= 1 everywhere: no usable candidate
    # small steps: after each, the cut-off (the best full D so far) is applied again
    chunk = max(1, min(EXACT_STEP, max_chunk_bytes // (_BLOCK_TEMPS * 8 * big_n)))
    done, every = 0, np.arange(big_n)
    while done < order.size and bound[order[done]] <= best_d:
        step = order[done : done + chunk]
        picked = np.sort(rows[step[bound[step] <= best_d]])
        ds = _ks_rows(log_x, alphas, picked, every).tolist()
        for i, d in zip(picked.tolist(), ds, strict=True):
            if d < best_d or (d == best_d and i < best_i):
                best_d, best_i = d, i
        done += chunk
    return best_i, best_d


def _chunks(rows: np.ndarray, width: int, max_chunk_bytes: int) -> list[slice]:
    step = max(1, max_chunk_bytes // (_BLOCK_TEMPS * 8 * max(1, width)))
    return [slice(s, min(rows.size, s + step)) for s in range(0, rows.size, step)]


def _ks_rows(log_x: np.ndarray, alphas: np.ndarray, rows: np.ndarray, cols: np.ndarray):
    """max over the positions ``cols`` inside each candidate's tail of ``|F_emp - F_fit|``, for
    the candidates ``rows`` (ascending); the same float64 terms as `_ks_block` (each term is
    computed by the same operations in the same order), so with every position it is D."""
    big_n = log_x.size
    inv_n = 1.0 / (big_n - rows.astype(np.float64))  # (c,)
    expo = 1.0 - alphas[rows]  # (c,)
    with np.errstate(over="ignore", invalid="ignore"):
        block = log_x[None, cols] - log_x[rows, None]  # (c, w)
        block *= expo[:, None]
        np.exp(block, out=block)
        block += (cols - big_n).astype(np.float64)[None, :] * inv_n[:, None]
        np.abs(block, out=block)
    block[cols[None, :] < rows[:, None]] = 0.0  # positions before a candidate: not in its tail
    return block.max(axis=1)


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
