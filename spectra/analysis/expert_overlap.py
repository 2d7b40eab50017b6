"""Expert redundancy: how much the experts of one MoE layer share their principal directions.

For the routed experts `W_1 .. W_E` of one layer and one role inside the expert (gate, up,
gate_up or down; all of one shape), take each expert's top-k singular vectors on the side of
the model width: the right singular vectors (input side) of gate/up/gate_up, the left ones
(output side) of down. `P_e (d, k)` is that orthonormal basis. The overlap of experts i and j is

    overlap(i, j) = ||P_i^T P_j||_F^2 / k  =  mean over the k principal angles of cos^2,

the normalized subspace similarity of the LoRA paper (Hu et al., arXiv 2106.09685, section 7.2,
with i = j = k). It is 1 for identical subspaces, 0 for orthogonal ones, and k / d in
expectation for independent random subspaces of R^d (the `baseline` reported with it). The width
side is used because it is invariant to the expert's own hidden-unit permutation (permuting the
rows of gate/up and the columns of down together leaves the function and these subspaces
unchanged), so two experts that compute the same function with permuted units still overlap 1.

k: `min(k, d // 4)` (at least 1), so the random baseline stays <= 1/4 whatever the width;
the basis is the exact float64 SVD when min(m, n) <= EXACT_MAX_SIDE, else spectra's seeded
randomized SVD (block Krylov, adaptive; methods.md section 1), whose top-k subspace matches
the exact one wherever the spectrum has a gap at k. Pairs with overlap >= REDUNDANT are listed
as redundant (`ExpertOverlap` in spectra.analysis.results).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from spectra.analysis.results import ExpertOverlap
from spectra.errors import ValidationError
from spectra.linalg.rsvd import RSVDOptions, randomized_svd

#: Experts whose overlap reaches this are listed as redundant (mean cos^2 of the principal
#: angles >= 0.9: on average within about 18 degrees of each other).
REDUNDANT = 0.9
#: Largest min(m, n) whose basis comes from the exact float64 SVD.
EXACT_MAX_SIDE = 1024
DEFAULT_K = 16


def width_side(expert_role: str | None) -> str:
    """ "out" for down (it writes the model width), "in" for the others (they read it)."""
    return "out" if expert_role == "down" else "in"


def effective_k(k: int, dim: int) -> int:
    """The k used on a side of dimension `dim`: min(k, dim // 4), at least 1."""
    return max(1, min(k, dim // 4))


def top_basis(W: torch.Tensor, side: str, k: int, *, seed: int = 0) -> torch.Tensor:
    """The top-k singular vectors of `W (m, n)` on `side` ("in": right, "out": left) as an
    orthonormal float64 basis `(d, k)` on the CPU."""
    if side not in ("in", "out"):
        raise ValidationError(f"side must be 'in' or 'out', got {side!r}")
    if min(W.shape) <= EXACT_MAX_SIDE:
        U, _, Vh = torch.linalg.svd(W.detach().to("cpu", torch.float64), full_matrices=False)
    else:
        U, _, Vh = randomized_svd(W.detach(), k, RSVDOptions(seed=seed), dtype=torch.float32)
    basis = U[:, :k] if side == "out" else Vh[:k].mT
    return basis.to("cpu", torch.float64).contiguous()


def overlap_matrix(bases: Sequence[torch.Tensor]) -> np.ndarray:
    """`O[i, j] = ||P_i^T P_j||_F^2 / k` for orthonormal bases `P_e (d, k)` (float64)."""
    if not bases:
        return np.zeros((0, 0))
    P = torch.stack([b.to(torch.float64) for b in bases])  # (E, d, k)
    k = P.shape[-1]
    cross = torch.einsum("adk,bdl->abkl", P, P)  # (E, E, k, k)
    return (cross.square().sum(dim=(-2, -1)) / k).numpy()


def expert_overlap(
    layer: int | None,
    expert_role: str | None,
    experts: Sequence[int],
    bases: Sequence[torch.Tensor],
) -> ExpertOverlap:
    """The ExpertOverlap of one group from its experts' bases (`top_basis`, one k and side)."""
    if len(experts) != len(bases) or not bases:
        raise ValidationError(f"{len(experts)} expert indices for {len(bases)} bases")
    dim, k = bases[0].shape
    mat = overlap_matrix(bases)
    pairs = [
        (experts[i], experts[j], float(mat[i, j]))
        for i in range(len(experts))
        for j in range(i + 1, len(experts))
        if mat[i, j] >= REDUNDANT
    ]
    pairs.sort(key=lambda p: -p[2])
    return ExpertOverlap(
        layer=layer,
        expert_role=expert_role,
        side=width_side(expert_role),
        dim=int(dim),
        k=int(k),
        baseline=k / dim,
        experts=tuple(int(e) for e in experts),
        overlap=tuple(tuple(float(v) for v in row) for row in mat),
        redundant=tuple(pairs),
    )
