"""The detX constraint of an ESD (WeightWatcher 0.7.7's `detX=True`; Martin & Mahoney's
"det X = 1" condition of the ERG / SETOL theory, arXiv 2507.17912).

Rescale the ESD to mean 1, `x = lambda M / sum lambda` (ascending). The tail that satisfies
`det X = 1` best starts at the largest index i (scanning down from the top) where the product of
`x_i .. x_M` first falls below 1: `detX_num = M - i` eigenvalues, `detX_val = lambda_i` (in the
ESD's own units). The product is accumulated as a sum of logarithms, so a long spectrum cannot
overflow it (WeightWatcher multiplies; on the MiniLM layers both agree exactly). An ESD whose
product never falls below 1 gives detX_num = M and detX_val = its smallest eigenvalue; a
constant or empty ESD gives None.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DetX:
    """detX_num: eigenvalues in the det X = 1 tail; detX_val: the smallest of them."""

    num: int
    value: float


def detx_constraint(evals: np.ndarray) -> DetX | None:
    """The detX tail of the ESD `evals` (any order); None if it has fewer than two distinct
    positive values."""
    lam = np.sort(np.asarray(evals, dtype=np.float64).ravel())
    if lam.size < 2 or not lam[0] < lam[-1] or not np.all(np.isfinite(lam)):
        return None
    total = float(lam.sum())
    if not total > 0:
        return None
    x = lam * (lam.size / total)
    with np.errstate(divide="ignore"):
        logs = np.log(x)
    from_top = np.cumsum(logs[::-1])  # k -> log prod of the top k + 1
    below = np.flatnonzero(from_top < 0.0)
    if below.size == 0:
        return DetX(num=int(lam.size), value=float(lam[0]))
    k = int(below[0]) + 1  # the top k eigenvalues
    return DetX(num=k, value=float(lam[lam.size - k]))
