"""`fit_entropy`: how sharply the power-law fit's KS distance singles out one xmin.

WeightWatcher 0.7.7 carries the line `fit_entropy = line_entropy(fit.Ds)` (commented out in its
`fit_powerlaw`, so it never reports the column; `line_entropy` is in its RMT_Util.py, its issue
#173): the Shannon entropy (natural log) of the histogram of the KS distances D over the xmin
candidates, in numpy's "auto" bins (the larger of the Sturges and Freedman-Diaconis bin counts):
`-sum p_k ln p_k`, `p_k` = share of candidates in bin k. Low: a few candidates stand apart
(a clear minimum); high: D is flat over many candidates (xmin poorly determined).
"""

from __future__ import annotations

import numpy as np


def line_entropy(ds: np.ndarray) -> float | None:
    """Entropy of the histogram of the distances `ds` (module docstring); None when empty or
    not finite."""
    values = np.asarray(ds, dtype=np.float64).ravel()
    if values.size == 0 or not np.all(np.isfinite(values)):
        return None
    counts, _ = np.histogram(values, bins="auto")
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log(p)))
