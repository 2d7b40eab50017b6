"""Which SVD an initializer gets: exact (LAPACK, float64 for small matrices) or randomized.

The exact route is `spectra.linalg.exact.exact_svd_slice` (float64 Gram eigenvectors, or the
full float64 SVD for nearly rank-deficient matrices). The choice for ``svd="auto"``: exact when
``min(m, n) <= EXACT_AUTO_MAX`` or the rank is a large share of it, randomized block Krylov
otherwise. Reason (methods.md section 1): the MiniLM spectra are flat at the top (S_8 / S_9 down
to 1.0015), where few power iterations miss the subspace (cosine 0.05 at q = 4), while an exact
SVD of all 37 MiniLM matrices takes under a second; on a 4096 x 4096 matrix block Krylov reaches
cosine 0.9999 24x faster than the full SVD.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from spectra.adapt.factorize import row_blocks
from spectra.adapt.registry import InitContext
from spectra.linalg.exact import exact_svd_slice
from spectra.linalg.rsvd import RSVDOptions, randomized_svd_info

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


def top_svd(W: Tensor, rank: int, ctx: InitContext) -> tuple[Tensor, Tensor, Tensor, dict]:
    """Top-``rank`` SVD of ``W (m, n)``: ``U (m, r), S (r,), Vh (r, n)`` plus facts for the
    manifest: ``svd`` (route), ``residual`` (``||W Vh^T - U diag(S)||_F / s_1``) and, for the
    randomized route, ``iterations``. With ``svd="auto"`` a randomized run that did not converge
    is redone exactly (``svd: "exact-fallback"``)."""
    if use_exact(tuple(W.shape), rank, ctx.svd):
        U, S, Vh, route = exact_svd_slice(W, rank, "top")
        return U, S, Vh, {"svd": f"exact-{route}", "residual": _residual(W, U, S, Vh)}
    res = randomized_svd_info(
        W, rank, RSVDOptions(method="krylov", seed=ctx.seed), dtype=torch.float32
    )
    info = {
        "svd": "randomized",
        "iterations": int(res.iterations[0]),
        "residual": float(res.residual[0]),
    }
    if ctx.svd == "auto" and not bool(res.converged[0]):
        U, S, Vh, route = exact_svd_slice(W, rank, "top")
        return U, S, Vh, {"svd": f"exact-fallback-{route}", "residual": _residual(W, U, S, Vh)}
    return res.U[0], res.S[0], res.Vh[0], info


def _residual(W: Tensor, U: Tensor, S: Tensor, Vh: Tensor) -> float:
    """``||W Vh^T - U diag(S)||_F / s_1`` in float64: 0 for an exact decomposition. In row
    blocks (`row_blocks`): no float64 copy of the whole W."""
    V64, S64 = Vh.double().T, S.double()
    norms = []
    for rows in row_blocks(tuple(W.shape)):
        diff = W[rows].double().to(U.device) @ V64 - U[rows].double() * S64
        norms.append(float(torch.linalg.matrix_norm(diff)))
    norm = norms[0] if len(norms) == 1 else math.sqrt(sum(v * v for v in norms))
    top = float(S[0]) if S.numel() and float(S[0]) > 0 else 1.0
    return norm / top
