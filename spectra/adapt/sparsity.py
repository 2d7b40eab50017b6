"""AlphaPruning's layer-wise sparsity: alpha mapped linearly around the target sparsity.

AlphaPruning (Lu et al. 2024, arXiv 2410.10912; its ``lib/prune.py`` ``ww_sparsity``), for the
prunable matrices of the transformer blocks in model order:

1. ``block_wise`` (its default): each matrix gets the mean metric of its block (layer);
2. ``r_i = (q_i - min q) / (max q - min q) * (s2 - s1) + s1`` with ``s1 = 1 - eps``,
   ``s2 = 1 + eps`` (``--epsilon``, 0.3 in its scripts): higher alpha (a less trained layer)
   is pruned more;
3. ``r_i *= sum(P) * s / sum(P * r)``, ``P`` the entries of each matrix and ``s`` the target
   sparsity, so the pruned share of all prunable entries is exactly ``s``.

Its pruners take one ratio per matrix in that order (``ratios[k]``). When every block has the
same metric (``max q == min q``, a 0/0 there) every ratio is ``s``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from spectra.errors import ValidationError

MAPPINGS = ("block_wise", "layer_wise")


def sparsity_ratios(
    metrics: Sequence[float],
    sizes: Sequence[int],
    blocks: Sequence[int],
    *,
    target: float,
    eps: float,
    mapping: str = "block_wise",
) -> np.ndarray:
    """Per-matrix sparsity ratios (module docstring); ``metrics``, ``sizes`` (entries) and
    ``blocks`` (block index of each matrix) in model order."""
    if not 0 < target < 1:
        raise ValidationError(f"target sparsity must be in (0, 1), got {target!r}")
    if not 0 <= eps < 1:
        raise ValidationError(f"epsilon must be in [0, 1), got {eps!r}")
    if mapping not in MAPPINGS:
        raise ValidationError(f"mapping {mapping!r} is not one of {', '.join(MAPPINGS)}")
    q = np.asarray(metrics, dtype=np.float64)
    P = np.asarray(sizes, dtype=np.float64)
    if q.size == 0 or q.size != P.size or q.size != len(blocks):
        raise ValidationError("metrics, sizes and blocks must be non-empty and of one length")
    if not np.all(np.isfinite(q)):
        raise ValidationError("every prunable matrix needs a finite alpha")
    if mapping == "block_wise":
        ids = np.asarray(blocks)
        means = {b: float(q[ids == b].mean()) for b in np.unique(ids)}
        q = np.array([means[b] for b in ids])
    span = float(q.max() - q.min())
    r = (q - q.min()) / span * (2 * eps) + (1 - eps) if span > 0 else np.ones_like(q)
    r = r * (P.sum() * target / float((P * r).sum()))
    if r.max() >= 1:
        raise ValidationError(
            f"the mapping gives a sparsity of {r.max():.3f} >= 1 to some matrix: lower "
            "--epsilon or the target sparsity"
        )
    return r
