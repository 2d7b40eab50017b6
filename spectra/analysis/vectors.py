"""Localization of singular vectors (WeightWatcher 0.7.7's `vectors=True`; Martin & Mahoney,
arXiv 1810.01075, section 5: eigenvectors of the heavy tail are localized, those of a random
bulk are delocalized).

The vectors are the eigenvectors v of the Gram matrix of the smaller side (W W^T when m <= n,
else W^T W), i.e. the singular vectors of that side, each of unit norm. Per vector:
- `loc_ratio = ||v||_1 / ||v||_inf` (small: localized);
- `part_ratio = ||v||_2 / ||v||_4` (participation; small: localized);
- `vec_entropy`: the entropy of a 100-bin density histogram of `|v_i| - mean|v|`, with
  `p = (h + 1e-10) / sqrt(2 pi)` normalized to sum 1, `-sum p ln p`.
The vectors are split by their eigenvalue at the power-law xmin: bulk `lambda < xmin`, tail
`lambda >= xmin`; each metric's mean and variance (ddof 0) over each part are the 12 columns
`{bulk,tail}_{mean,var}_{vec_entropy,loc_ratio,part_ratio}` (None for an empty part).
Cost: one float64 eigendecomposition with vectors of the M x M Gram matrix per matrix (the
engine's default spectrum route computes eigenvalues only), computed on the spectrum pass's read.
"""

from __future__ import annotations

import numpy as np
import torch

ENTROPY_BINS = 100
ENTROPY_EPS = 1e-10  # WeightWatcher's EPSILON, added to each histogram density
METRICS = ("vec_entropy", "loc_ratio", "part_ratio")
COLUMNS = tuple(
    f"{part}_{stat}_{metric}"
    for metric in METRICS
    for part in ("bulk", "tail")
    for stat in ("mean", "var")
)


def gram_eigvectors(W: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (M,) ascending and unit eigenvectors (M, M) (columns) of the float64 Gram
    matrix of W's smaller side."""
    A = W.detach().to(device="cpu", dtype=torch.float64)
    X = A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A
    evals, vecs = torch.linalg.eigh(X)
    return evals.numpy(), vecs.numpy()


def discrete_entropy(v: np.ndarray, bins: int = ENTROPY_BINS) -> float:
    """Entropy of the 100-bin density histogram of |v| - mean|v| (module docstring)."""
    a = np.abs(v)
    h = np.histogram(a - a.mean(), density=True, bins=bins)[0]
    p = (h + ENTROPY_EPS) / np.sqrt(2.0 * np.pi)
    p = p / p.sum()
    return float(-np.sum(p * np.log(p)))


def vector_metrics(vecs: np.ndarray) -> dict[str, np.ndarray]:
    """loc_ratio, part_ratio and vec_entropy of each column of `vecs` (d, k): each (k,)."""
    a = np.abs(vecs)
    return {
        "vec_entropy": np.array([discrete_entropy(vecs[:, j]) for j in range(vecs.shape[1])]),
        "loc_ratio": a.sum(axis=0) / a.max(axis=0),
        "part_ratio": np.sqrt((a**2).sum(axis=0)) / ((a**4).sum(axis=0)) ** 0.25,
    }


def localization(
    evals: np.ndarray, vecs: np.ndarray, xmin: float | None
) -> dict[str, float | None]:
    """The 12 bulk/tail columns (module docstring); all None without an xmin."""
    out: dict[str, float | None] = dict.fromkeys(COLUMNS)
    if xmin is None:
        return out
    per = vector_metrics(vecs)
    tail = evals >= xmin
    for metric in METRICS:
        for part, mask in (("bulk", ~tail), ("tail", tail)):
            values = per[metric][mask]
            if values.size:
                out[f"{part}_mean_{metric}"] = float(np.mean(values))
                out[f"{part}_var_{metric}"] = float(np.var(values))
    return out
