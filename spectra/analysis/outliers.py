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
CHUNK_ELEMENTS = 4 * 2**20  # rows per block so one float32 score block is <= 16 MB


def outlier_ratio(
    W: torch.Tensor,
    *,
    multiplier: float = DEFAULT_MULTIPLIER,
    act_norms: torch.Tensor | None = None,
) -> float | None:
    """Share of entries of W (m, n) whose score exceeds `multiplier` times the mean score.

    act_norms: optional (n,) L2 norms of the layer's input features (OWL's activation-aware
    score). Computed in float32 at least (float64 for float64 W), on W's device, in row blocks
    of CHUNK_ELEMENTS entries, so a bf16 W is never upcast whole. Returns None when W has
    NaN/Inf entries or is all zeros (no meaningful mean).

    >>> outlier_ratio(torch.tensor([[1.0, 1.0, 1.0, 100.0]]), multiplier=3.0)
    0.25
    """
    if W.ndim != 2 or W.numel() == 0:
        raise ValidationError(f"W must be a non-empty 2-D tensor, got shape {tuple(W.shape)}")
    if not multiplier > 0:
        raise ValidationError(f"multiplier must be > 0, got {multiplier}")
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    if act_norms is not None:
        if act_norms.shape != (W.shape[1],):
            raise ValidationError(
                f"act_norms must have shape ({W.shape[1]},) for W {tuple(W.shape)}, "
                f"got {tuple(act_norms.shape)}"
            )
        act_norms = act_norms.to(device=W.device, dtype=dtype)
    rows = max(1, CHUNK_ELEMENTS // W.shape[1])
    total = torch.zeros((), dtype=torch.float64, device=W.device)
    for start in range(0, W.shape[0], rows):
        total += _scores(W[start : start + rows], dtype, act_norms).sum(dtype=torch.float64)
    mean = total / W.numel()
    if not torch.isfinite(mean) or mean <= 0:
        return None
    cut = multiplier * mean.to(dtype)
    count = 0
    if act_norms is None and W.dtype in _NARROW_INT:
        # |W| of a bf16/fp16 W is exact in its own dtype, and for such x, x > cut exactly when
        # x > (the largest value of that dtype <= cut): the count needs no float32 copy (half
        # the time of the outlier ratio of a bf16 matrix, the same count)
        edge = _at_most(cut, W.dtype)
        for start in range(0, W.shape[0], rows):
            count += int(torch.count_nonzero(W[start : start + rows].detach().abs() > edge))
        return count / W.numel()
    for start in range(0, W.shape[0], rows):
        count += int(torch.count_nonzero(_scores(W[start : start + rows], dtype, act_norms) > cut))
    return count / W.numel()


# narrow float dtype -> the integer dtype of its bits (to step to the next lower value)
_NARROW_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _at_most(cut: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest value of `dtype` that is <= `cut` (a positive float32 0-d tensor)."""
    edge = cut.to(dtype)  # nearest: at most one step above cut
    if edge.to(cut.dtype) > cut:  # positive: one step down is one less in the bits
        edge = (edge.view(_NARROW_INT[dtype]) - 1).view(dtype)
    return edge


def _scores(
    block: torch.Tensor, dtype: torch.dtype, act_norms: torch.Tensor | None
) -> torch.Tensor:
    """|W| (times the input norms) of a row block, in `dtype`: (rows, n). The absolute value is
    taken before the upcast (exact either way; on bf16/fp16 it reads half the bytes)."""
    score = block.detach().abs().to(dtype)  # abs made a new tensor: safe to scale in place
    if act_norms is not None:
        score.mul_(act_norms[None, :])
    return score
