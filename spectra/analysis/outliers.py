"""Weight-magnitude outlier ratio of a layer (OWL / OwLore, arXiv 2405.18380).

Score `A_ij = |W_ij|` (weights only) or `A_ij = |W_ij| * ||X_j||_2` when the input-activation
norms of the layer are known; the ratio is the share of entries with `A_ij > M * mean(A)`.
OwLore's released code uses M = 13 (the default here). Pure function of the weight tensor: the
analyze loop calls it while W is in memory.
"""

from __future__ import annotations

import torch

from spectra.errors import ValidationError

DEFAULT_MULTIPLIER = 13.0  # OwLore's shipped threshold (arXiv 2405.18380)


def outlier_ratio(
    W: torch.Tensor,
    *,
    multiplier: float = DEFAULT_MULTIPLIER,
    act_norms: torch.Tensor | None = None,
) -> float | None:
    """Share of entries of W (m, n) whose score exceeds `multiplier` times the mean score.

    act_norms: optional (n,) L2 norms of the layer's input features (OWL's activation-aware
    score). Computed in float32 at least, on W's device. Returns None when W has NaN/Inf
    entries or is all zeros (no meaningful mean).

    >>> outlier_ratio(torch.tensor([[1.0, 1.0, 1.0, 100.0]]), multiplier=3.0)
    0.25
    """
    if W.ndim != 2 or W.numel() == 0:
        raise ValidationError(f"W must be a non-empty 2-D tensor, got shape {tuple(W.shape)}")
    if not multiplier > 0:
        raise ValidationError(f"multiplier must be > 0, got {multiplier}")
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    score = W.detach().to(dtype).abs()  # (m, n)
    if act_norms is not None:
        if act_norms.shape != (W.shape[1],):
            raise ValidationError(
                f"act_norms must have shape ({W.shape[1]},) for W {tuple(W.shape)}, "
                f"got {tuple(act_norms.shape)}"
            )
        score = score * act_norms.to(device=score.device, dtype=dtype)[None, :]
    mean = score.mean()
    if not torch.isfinite(mean) or mean <= 0:
        return None
    count = int(torch.count_nonzero(score > multiplier * mean))
    return count / score.numel()
