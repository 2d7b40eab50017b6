"""The update dW = W_ft - W_base: its spectrum, rank and size, and the drift of top subspaces.

Pure functions over tensors. Definitions (stated in every output):
- numerical rank: number of singular values of dW with S_i > S_1 * max(m, n) * eps32
  (eps32 = 2^-23 ~ 1.19e-7, float32 machine epsilon: weights are stored in float32 at best, so
  finer structure than that is rounding, not training). `RANK_RTOL_RULE` spells it out; the
  count is htsr.py's `numerical_rank`, the same rule as for a weight matrix.
- stable rank: ||dW||_F^2 / ||dW||_2^2 = sum S^2 / S_1^2.
- effective rank (Roy & Vetterli 2007): exp(H), H = -sum p_i ln p_i, p_i = S_i / sum S.
- energy share of the top r: sum_{i<=r} S_i^2 / sum S^2; energy rank: the smallest r whose share
  reaches `ENERGY_LEVEL` (0.99), robust to the low-precision rounding noise that makes a merged
  LoRA full rank in the strict sense.
- relative change: ||dW||_F / ||W_base||_F.
- principal angles between the top-k left singular subspaces of base and fine-tune (Bjorck &
  Golub 1973): cosines are the singular values of U_b^T U_f, largest first.
A LoRA update dW = s B A (B (m, r), A (r, n)) has its SVD computed from the factors: QR of B and
A^T, then an r x r SVD of R_B R_A^T; dW is never formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from spectra.analysis.htsr import numerical_rank, rank_tolerance
from spectra.errors import NumericalError, ValidationError
from spectra.linalg.checks import all_finite
from spectra.linalg.exact import gram_left_svd, gram_svdvals, gram_svdvals_diff

RANK_RTOL_RULE = "S_i > S_1 * max(m, n) * eps32 (eps32 = 1.19e-7)"
ENERGY_LEVEL = 0.99
TOP_VALUES = 64  # singular values of dW kept per matrix (JSON and plots)


def effective_rank(s: torch.Tensor) -> float:
    """exp of the Shannon entropy of p = S / sum S (Roy & Vetterli 2007); 0 for a zero update."""
    s = s.to(torch.float64)
    total = float(s.sum())
    if total <= 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def energy_share(s: torch.Tensor, r: int) -> float | None:
    """Share of sum S^2 held by the top r singular values (None for a zero update)."""
    e = s.to(torch.float64) ** 2
    total = float(e.sum())
    if total <= 0.0:
        return None
    return float(e[:r].sum()) / total


def energy_rank(s: torch.Tensor, level: float = ENERGY_LEVEL) -> int:
    """Smallest r whose top-r energy share reaches `level` (0 for a zero update)."""
    e = s.to(torch.float64) ** 2
    total = float(e.sum())
    if total <= 0.0:
        return 0
    cum = torch.cumsum(e, 0) / total
    return int((cum < level - 1e-12).sum().item()) + 1


@dataclass(frozen=True)
class UpdateStats:
    """Statistics of dW = W_ft - W_base for one (m, n) matrix. See the module docstring.

    top_singular_values: the largest min(TOP_VALUES, rank-limit) singular values of dW.
    energy_topk: energy share of the top k (k = the comparison's k).
    """

    shape: tuple[int, int]
    numerical_rank: int
    rank_tol: float
    stable_rank: float | None
    effective_rank: float
    energy_rank: int
    energy_topk: float | None
    k: int
    fro_norm: float
    spectral_norm: float
    rel_change: float | None
    top_singular_values: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "numerical_rank": self.numerical_rank,
            "rank_tol": self.rank_tol,
            "rank_rule": RANK_RTOL_RULE,
            "stable_rank": _finite(self.stable_rank),
            "effective_rank": self.effective_rank,
            "energy_rank": self.energy_rank,
            "energy_level": ENERGY_LEVEL,
            "energy_topk": _finite(self.energy_topk),
            "k": self.k,
            "fro_norm": self.fro_norm,
            "spectral_norm": self.spectral_norm,
            "rel_change": _finite(self.rel_change),
            "top_singular_values": list(self.top_singular_values),
        }


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def update_stats(
    s_dw: torch.Tensor, *, shape: tuple[int, int], base_fro: float, k: int = 10
) -> UpdateStats:
    """UpdateStats from the singular values `s_dw` (descending) of dW (m, n).

    base_fro: ||W_base||_F (for the relative change); k: the r of the top-r energy share.
    Only the nonzero part of the spectrum is needed (a LoRA update passes its r values).
    """
    if k < 1:
        raise ValidationError(f"k must be >= 1, got {k}")
    s = s_dw.detach().to("cpu", torch.float64).flatten()
    if not bool(torch.isfinite(s).all()):
        raise NumericalError(f"the update of a {shape} matrix has NaN/Inf singular values")
    s = torch.sort(s, descending=True).values
    s1 = float(s[0]) if s.numel() else 0.0
    fro = float(torch.sqrt((s**2).sum())) if s.numel() else 0.0
    return UpdateStats(
        shape=(int(shape[0]), int(shape[1])),
        numerical_rank=numerical_rank(s.numpy(), max(shape)),
        rank_tol=rank_tolerance(s1, max(shape)),
        stable_rank=(fro**2 / s1**2) if s1 > 0 else None,
        effective_rank=effective_rank(s),
        energy_rank=energy_rank(s),
        energy_topk=energy_share(s, k),
        k=k,
        fro_norm=fro,
        spectral_norm=s1,
        rel_change=(fro / base_fro) if base_fro > 0 else None,
        top_singular_values=tuple(float(x) for x in s[:TOP_VALUES].tolist()),
    )


def lowrank_update_svd(
    a: torch.Tensor, b: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of dW = scale * B @ A from the factors, without forming dW.

    a: (r, n) LoRA A; b: (m, r) LoRA B. QR: B = Q_B R_B, A^T = Q_A R_A, so
    dW = scale * Q_B (R_B R_A^T) Q_A^T; the r x r SVD of the middle gives
    U = Q_B U_s (m, r), S (r,), Vh = Vh_s Q_A^T (r, n). Computed in float64.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise ValidationError(
            f"LoRA factors must be A (r, in) and B (out, r); got A {tuple(a.shape)}, "
            f"B {tuple(b.shape)}"
        )
    a64, b64 = a.to(torch.float64), b.to(device=a.device, dtype=torch.float64)
    q_b, r_b = torch.linalg.qr(b64)  # (m, r), (r, r)
    q_a, r_a = torch.linalg.qr(a64.mT)  # (n, r), (r, r)
    u_s, s, vh_s = torch.linalg.svd(float(scale) * (r_b @ r_a.mT))  # (r, r), (r,), (r, r)
    return q_b @ u_s, s, vh_s @ q_a.mT


def left_singular(w: torch.Tensor, *, top: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (m, M or top), S (M,)) of one (m, n) matrix, M = min(m, n), in float64 (float32 on MPS).

    The float64 Gram-eigenvector route (`spectra.linalg.exact.gram_left_svd`): the comparison
    needs left vectors and all values, never the right vectors, so no full SVD is taken. `w` may
    be in any floating dtype (upcast exactly, without a float64 copy besides the QR's buffer);
    the full U of a tall matrix is column-major.
    """
    if not all_finite(w):
        raise NumericalError(f"a {tuple(w.shape)} matrix has NaN/Inf entries; cannot take its SVD")
    return gram_left_svd(w, top=top)


def update_svdvals(dw: torch.Tensor) -> torch.Tensor:
    """All singular values of an update dW (m, n), descending: float64 Gram eigenvalues (exact
    far below the numerical-rank tolerance S_1 max(m, n) eps32), `svdvals` on MPS (no float64)."""
    if dw.device.type == "mps":
        return torch.linalg.svdvals(dw)
    return gram_svdvals(dw[None])[0]


def update_svdvals_between(w_base: torch.Tensor, w_ft: torch.Tensor) -> torch.Tensor:
    """`update_svdvals(w_ft - w_base)` with the same bits (float64 inputs or exact upcasts), but
    dW formed one float64 slice at a time (`gram_svdvals_diff`): no copy of dW, and none of the
    inputs in float64, for a large pair. Both (m, n), any floating dtype, finite."""
    if w_base.device.type == "mps":
        return torch.linalg.svdvals(w_ft.to(torch.float32) - w_base.to(torch.float32))
    return gram_svdvals_diff(w_ft, w_base)


@dataclass(frozen=True)
class SubspaceDrift:
    """Principal angles between the top-k left singular subspaces of base and fine-tune.

    cosines: (k,) cos of the principal angles, largest first (1 = the direction is shared).
    """

    cosines: tuple[float, ...]

    @property
    def k(self) -> int:
        return len(self.cosines)

    @property
    def angles_deg(self) -> tuple[float, ...]:
        return tuple(math.degrees(math.acos(min(1.0, max(0.0, c)))) for c in self.cosines)

    @property
    def min_cos(self) -> float:
        return min(self.cosines) if self.cosines else 1.0

    @property
    def mean_cos(self) -> float:
        return sum(self.cosines) / len(self.cosines) if self.cosines else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "cosines": list(self.cosines),
            "angles_deg": list(self.angles_deg),
            "min_cos": self.min_cos,
            "mean_cos": self.mean_cos,
        }


def principal_cosines(u_a: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(u_a) and span(u_b), both (m, k) orthonormal.

    Returns (min(k_a, k_b),) float64, descending, clamped to [0, 1].
    """
    if u_a.ndim != 2 or u_b.ndim != 2 or u_a.shape[0] != u_b.shape[0]:
        raise ValidationError(
            f"principal angles need two (m, k) bases with the same m; got {tuple(u_a.shape)} "
            f"and {tuple(u_b.shape)}"
        )
    dtype = torch.float32 if u_a.device.type == "mps" else torch.float64
    c = torch.linalg.svdvals(u_a.to(dtype).mT @ u_b.to(device=u_a.device, dtype=dtype))
    return c.clamp(0.0, 1.0).cpu().to(torch.float64)


def subspace_drift(u_base_topk: torch.Tensor, u_ft_topk: torch.Tensor) -> SubspaceDrift:
    """SubspaceDrift between two (m, k) top-k singular bases."""
    return SubspaceDrift(tuple(float(c) for c in principal_cosines(u_base_topk, u_ft_topk)))
