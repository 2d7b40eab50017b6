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
from spectra.linalg.exact import exact_svd, top_eigh
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


def full_svd(W: Tensor, *, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """Thin exact SVD ``W (m, n) -> U (m, M), S (M,), Vh (M, n)`` in ``dtype``, S descending.
    MPS has no float64: the matrix moves to the CPU for it."""
    if dtype == torch.float64 and W.device.type == "mps":
        W = W.cpu()
    return exact_svd(W, dtype=dtype)


def exact_slice(W: Tensor, rank: int, which: str = "top") -> tuple[Tensor, Tensor, Tensor, str]:
    """Exact top or bottom ``rank`` singular triplets of ``W (m, n)`` in float64.

    Route "gram64": eigenvectors of the smaller float64 Gram matrix give one side, the other is
    ``W v_i / s_i``. About 8x faster than a float64 SVD on MiniLM shapes (0.26 s vs 2.0 s for
    1536 x 384 on 2 busy cores) and accurate when ``s_i >> sqrt(eps64) s_1``: the eigenvalue error
    is about ``eps64 s_1^2`` (methods.md section 1). Kept components below ``1e-6 s_1`` (nearly
    rank-deficient matrices, MiLoRA's bottom) fall back to the full float64 SVD, route "svd64".
    """
    W64 = W.cpu().double() if W.device.type == "mps" else W.double()
    m, n = W64.shape
    wide = m < n
    G = W64 @ W64.T if wide else W64.T @ W64  # (M, M)
    if which == "top":
        lam, vecs = top_eigh(G, rank)  # ascending
        top_sq = lam[-1] if lam.numel() else G.new_zeros(())
    else:
        evals, evecs = torch.linalg.eigh(G)  # ascending
        lam, vecs, top_sq = evals[:rank], evecs[:, :rank], evals[-1]
    S = lam.flip(0).clamp_min(0).sqrt()  # descending within the slice
    vecs = vecs.flip(1)
    top = float(top_sq.clamp_min(0).sqrt())
    if S.numel() == 0 or float(S[-1]) <= 1e-6 * top:
        U, S_all, Vh = full_svd(W64)
        pick = slice(0, rank) if which == "top" else slice(S_all.numel() - rank, None)
        return U[:, pick], S_all[pick], Vh[pick], "svd64"
    other = (vecs.T @ W64) / S.unsqueeze(1) if wide else (W64 @ vecs) / S  # the other side
    if wide:
        return vecs, S, other, "gram64"  # U (m, r), Vh (r, n)
    return other, S, vecs.T, "gram64"


def top_svd(W: Tensor, rank: int, ctx: InitContext) -> tuple[Tensor, Tensor, Tensor, dict]:
    """Top-``rank`` SVD of ``W (m, n)``: ``U (m, r), S (r,), Vh (r, n)`` plus facts for the
    manifest: ``svd`` (route), ``residual`` (``||W Vh^T - U diag(S)||_F / s_1``) and, for the
    randomized route, ``iterations``. With ``svd="auto"`` a randomized run that did not converge
    is redone exactly (``svd: "exact-fallback"``)."""
    if use_exact(tuple(W.shape), rank, ctx.svd):
        U, S, Vh, route = exact_slice(W, rank, "top")
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
        U, S, Vh, route = exact_slice(W, rank, "top")
        return U, S, Vh, {"svd": f"exact-fallback-{route}", "residual": _residual(W, U, S, Vh)}
    return res.U[0], res.S[0], res.Vh[0], info


def _residual(W: Tensor, U: Tensor, S: Tensor, Vh: Tensor) -> float:
    """``||W Vh^T - U diag(S)||_F / s_1`` in float64: 0 for an exact decomposition."""
    W64 = W.double().to(U.device)
    diff = W64 @ Vh.double().T - U.double() * S.double()
    top = float(S[0]) if S.numel() and float(S[0]) > 0 else 1.0
    return float(torch.linalg.matrix_norm(diff)) / top
