"""Which SVD an initializer gets: exact (LAPACK, float64 for small matrices) or randomized.

The choice for ``svd="auto"``: exact when ``min(m, n) <= EXACT_AUTO_MAX`` or the rank is a large
share of it, randomized block Krylov otherwise. Reason (methods.md section 1): the MiniLM spectra
are flat at the top (S_8 / S_9 down to 1.0015), where few power iterations miss the subspace
(cosine 0.05 at q = 4), while an exact SVD of all 37 MiniLM matrices takes under a second; on a
4096 x 4096 matrix block Krylov reaches cosine 0.9999 24x faster than the full SVD.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spectra.adapt.registry import InitContext
from spectra.linalg import exact_svd, randomized_svd_info

# Up to this min(m, n) the exact SVD costs well under a second per matrix on one CPU core.
EXACT_AUTO_MAX = 1024
# Past this share of min(m, n) a randomized top-k saves little and is less accurate.
EXACT_AUTO_RANK_SHARE = 0.25


def use_exact(shape: tuple[int, int], rank: int, mode: str) -> bool:
    """True when ``mode`` (auto/exact/randomized) resolves to the exact SVD for this matrix."""
    if mode == "exact":
        return True
    if mode == "randomized":
        return False
    small = min(shape)
    return small <= EXACT_AUTO_MAX or rank > EXACT_AUTO_RANK_SHARE * small


def full_svd(W: Tensor, *, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """Thin exact SVD ``W (m, n) -> U (m, M), S (M,), Vh (M, n)`` in ``dtype``, S descending.
    MPS has no float64: the matrix moves to the CPU for it."""
    if dtype == torch.float64 and W.device.type == "mps":
        W = W.cpu()
    return exact_svd(W, dtype=dtype)


def top_svd(W: Tensor, rank: int, ctx: InitContext) -> tuple[Tensor, Tensor, Tensor, dict]:
    """Top-``rank`` SVD of ``W (m, n)``: ``U (m, r), S (r,), Vh (r, n)`` plus facts for the
    manifest: ``svd`` (route), ``residual`` (max_i ||W^T u_i - s_i v_i|| / s_1) and, for the
    randomized route, ``iterations``. With ``svd="auto"`` a randomized run that did not converge
    is redone exactly (``svd: "exact-fallback"``)."""
    if use_exact(tuple(W.shape), rank, ctx.svd):
        U, S, Vh = full_svd(W)
        return U[:, :rank], S[:rank], Vh[:rank], {"svd": "exact", "residual": 0.0}
    res = randomized_svd_info(W, rank, method="krylov", seed=ctx.seed, dtype=torch.float32)
    info = {
        "svd": "randomized",
        "iterations": int(res.iterations[0]),
        "residual": float(res.residual[0]),
    }
    if ctx.svd == "auto" and not bool(res.converged[0]):
        U, S, Vh = full_svd(W)
        return U[:, :rank], S[:rank], Vh[:rank], {"svd": "exact-fallback", "residual": 0.0}
    return res.U[0], res.S[0], res.Vh[0], info
