"""AlphaPruning's heavy-tail metric ``alpha_peak``: a Hill estimate with xmin near the ESD peak.

AlphaPruning (Lu et al. 2024, "AlphaPruning: Using Heavy-Tailed Self Regularization Theory for
Improved Layer-wise Pruning of Large Language Models", arXiv 2410.10912) scores each matrix with
the PL_Alpha_Hill metric of its ESD (``lambda = S^2``, ascending), xmin chosen by its
``fix_fingers='xmin_peak'`` rule (its ``lib/esd_utils.py``, the default ``--ww_metric
alpha_peak``):

- histogram of ``log10(lambda)`` in 100 equal bins between its min and max; ``xmin2 = 10 ^``
  (left edge of the fullest bin, first on ties);
- candidates ``lambda_i`` (every eigenvalue but the largest) from the bottom, skipping those
  below ``log10(0.95 xmin2)`` and stopping at the first above ``1.5 xmin2`` (the lower bound is
  compared in log units against a raw eigenvalue in that code; reproduced as written);
- per candidate, with ``n = N - i``: ``alpha_i = 1 + n / (sum_{j >= i} ln lambda_j -
  n ln lambda_i)`` and, when ``alpha_i > 1``, the KS distance ``D_i = max_k |1 - (lambda_{i+k} /
  lambda_i)^(1 - alpha_i) - k / n|`` (else ``D_i = 1``; a skipped candidate keeps alpha 0 and D 1);
- the answer is the candidate with the smallest D (first on ties).

Computed in float64 (the original works in float32 on float32 singular values), vectorized
over candidates in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spectra.errors import ValidationError

BINS = 100
CHUNK_ENTRIES = 1 << 22  # candidates x tail entries per vectorized block (32 MiB of float64)


@dataclass(frozen=True)
class HillFit:
    """alpha_peak of one ESD: alpha, its KS distance D and the chosen xmin."""

    alpha: float
    D: float
    xmin: float


def alpha_peak(evals: np.ndarray, *, bins: int = BINS) -> HillFit:
    """AlphaPruning's ``alpha_peak`` of the eigenvalues ``evals`` (module docstring)."""
    eigs = np.sort(np.asarray(evals, dtype=np.float64).ravel())
    N = eigs.size
    if N < 2 or not np.all(np.isfinite(eigs)) or eigs[0] <= 0:
        raise ValidationError(
            f"alpha_peak needs >= 2 positive finite eigenvalues, got {N} (min "
            f"{eigs[0] if N else None})"
        )
    logs = np.log(eigs)
    h = np.log10(eigs)
    counts, edges = np.histogram(h, bins=bins, range=(h.min(), h.max()))
    xmin2 = 10 ** edges[int(np.argmax(counts))]
    low, high = np.log10(0.95 * xmin2), 1.5 * xmin2
    cand = eigs[:-1]
    start = int(np.searchsorted(cand, low, side="left"))  # first candidate >= low
    above = np.nonzero(cand[start:] > high)[0]
    stop = start + int(above[0]) if above.size else N - 1
    alphas = np.zeros(N - 1)
    Ds = np.ones(N - 1)
    tail_log = np.cumsum(logs[::-1])[::-1]  # sum_{j >= i} ln lambda_j
    idx = np.arange(start, stop)
    n = (N - idx).astype(np.float64)
    alphas[idx] = 1.0 + n / (tail_log[idx] - n * logs[idx])
    step = max(1, CHUNK_ENTRIES // N)
    for s in range(start, stop, step):
        Ds[s : min(stop, s + step)] = _ks(eigs, alphas, np.arange(s, min(stop, s + step)))
    best = int(np.argmin(Ds))
    return HillFit(float(alphas[best]), float(Ds[best]), float(eigs[best]))


def _ks(eigs: np.ndarray, alphas: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """KS distances of the candidates ``idx`` (1 where alpha <= 1)."""
    N = eigs.size
    k = np.arange(N)[None, :]
    pos = idx[:, None] + k  # index of the k-th tail entry
    valid = pos < N
    n = (N - idx)[:, None].astype(np.float64)
    a = alphas[idx][:, None]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        ratio = eigs[np.minimum(pos, N - 1)] / eigs[idx][:, None]
        dev = np.abs(1.0 - ratio ** (1.0 - a) - k / n)
    dev = np.where(valid, dev, -np.inf)
    D = dev.max(axis=1)
    return np.where(alphas[idx] > 1, D, 1.0)
