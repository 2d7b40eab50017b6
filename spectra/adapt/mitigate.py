"""Intruder-dimension mitigation of one matrix (pure tensor functions, float64).

Shuttleworth, Andreas, Torralba, Sharma, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", arXiv 2410.21228 (docs/methods.md section 3): scale each intruder direction of the
fine-tuned matrix, ``W' = W_t + (lambda - 1) u_i s_i v_i^T``, where ``u_i`` is one of the top-k left
singular vectors of ``W_t`` whose max |cos| against every left singular vector of the base is
below epsilon. Detection is compare's (``spectra.analysis.intruders`` on the float64 Gram
eigenvectors of ``spectra.analysis.drift.left_singular``), so the directions mitigated are the
ones ``spectra compare`` counts at that epsilon.

``u_i s_i v_i^T = u_i u_i^T W_t`` for a singular vector, so ``W' = W_t - (1 - lambda) U_I U_I^T
W_t``: no right vectors and no full SVD are needed (``scale_directions``).

For a LoRA adapter (``W_t = W_0 + s B A``) the same change is expressed without densifying the
model in two ways:

- ``extend_factors`` ("extend", the default): the adapter grows by one rank per direction,
  ``A' = [A; A_I]``, ``B' = [B, B_I]`` with ``s B_I A_I = (lambda - 1) U_I U_I^T W_t``, same scale
  (alpha raised with the rank); ``W_0 + s B' A' = W'`` exactly.
- ``refit_factors`` ("peft"): PEFT 0.21.2's ``reduce_intruder_dimension``: the best rank-r
  approximation of ``(W' - W_0) / s`` (SVD, ``sqrt(S)`` shared between B and A), same rank and
  scale; ``W' `` is then only approximated when the intruder directions leave the adapter's span.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from spectra.analysis.drift import left_singular
from spectra.analysis.intruders import intruder_dimensions
from spectra.errors import ValidationError


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """float64, or float32 on MPS (no float64 there), as compare computes."""
    return torch.float32 if t.device.type == "mps" else torch.float64


def check_lambda(lam: float) -> float:
    """lambda as a float in (0, 1] (1 leaves the matrix as it is); ValidationError otherwise."""
    ok = isinstance(lam, (int, float)) and not isinstance(lam, bool)
    if not ok or not 0.0 < float(lam) <= 1.0:  # NaN fails too
        raise ValidationError(
            f"lambda must be a number in (0, 1], got {lam!r}: it is the factor an intruder "
            "direction's singular value is multiplied by (the paper uses 0.5-0.75; PEFT's "
            "default is 0.75)"
        )
    return float(lam)


@dataclass(frozen=True)
class Direction:
    """One mitigated direction: its position among the fine-tune's top-k (0 = largest), its
    singular value before and after, its max |cos| against the base, and its position in the
    mitigated matrix's spectrum (< k: still among the top-k there, and still an intruder)."""

    index: int
    singular_value: float
    max_cos: float
    new_singular_value: float
    new_position: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "singular_value": self.singular_value,
            "max_cos": self.max_cos,
            "new_singular_value": self.new_singular_value,
            "new_position": self.new_position,
        }


@dataclass(frozen=True)
class Detection:
    """The intruders of one fine-tuned matrix: the top-k left vectors `u_top` (m, k) of W_t,
    all its singular values `s` (descending), their max |cos| and the intruder positions."""

    u_top: torch.Tensor
    s: torch.Tensor
    max_cos: tuple[float, ...]
    indices: tuple[int, ...]


def detect_intruders(
    w_base: torch.Tensor,
    w_ft: torch.Tensor,
    k: int,
    epsilon: float,
    base_svd: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Detection:
    """Intruder directions of `w_ft` against `w_base` (both (m, n)) exactly as compare finds
    them: top-min(k, m, n) left vectors of W_t, max |cos| against the base's thin U, below
    `epsilon`. `base_svd`: the base's (U, S) when already at hand (e.g. from the cache)."""
    kk = min(int(k), *w_base.shape)
    u0, _ = base_svd if base_svd is not None else left_singular(w_base)
    u1, s1 = left_singular(w_ft, top=kk)
    found = intruder_dimensions(u1[:, :kk], u0.contiguous().to(u1), (epsilon,))
    return Detection(u1[:, :kk], s1, found.max_cos, found.intruder_indices(epsilon))


def scale_directions(w_ft: torch.Tensor, u_dirs: torch.Tensor, lam: float) -> torch.Tensor:
    """``W' = W_t + (lambda - 1) sum_i u_i s_i v_i^T = W_t - (1 - lambda) U U^T W_t`` for
    orthonormal left singular vectors ``U`` (m, d) of ``W_t`` (float64 result)."""
    w = w_ft.to(work_dtype(w_ft))
    u = u_dirs.to(w)
    return w - (1.0 - check_lambda(lam)) * (u @ (u.mT @ w))


def moved_directions(det: Detection, lam: float) -> tuple[Direction, ...]:
    """Where each mitigated direction lands: its value times lambda, its position in the new
    spectrum (ties keep the untouched value first)."""
    s = det.s.detach().to("cpu", torch.float64).clone()
    for i in det.indices:
        s[i] = s[i] * lam
    moved = set(det.indices)
    order = sorted(range(len(s)), key=lambda j: (-float(s[j]), j in moved, j))
    position = {j: p for p, j in enumerate(order)}
    return tuple(
        Direction(
            index=i,
            singular_value=float(det.s[i].item()),
            max_cos=det.max_cos[i],
            new_singular_value=float(s[i]),
            new_position=position[i],
        )
        for i in det.indices
    )


def extend_factors(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    mitigation: tuple[torch.Tensor, torch.Tensor, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of rank r + d with ``scale * B' A' = scale * B A + (lambda - 1) U U^T W_t``.

    a (r, n), b (m, r); mitigation = (U (m, d) the directions, W_t (m, n), lambda). The new
    rows/columns carry ``(lambda - 1) s_i u_i v_i^T``: ``B_i = -sign(scale) u_i sqrt(c_i)``,
    ``A_i = sqrt(c_i) v_i^T`` with ``c_i = (1 - lambda) s_i / |scale|``, ``s_i v_i^T = u_i^T
    W_t`` (norms shared between the two factors). Float64 results.
    """
    u, w_ft, lam = mitigation
    if not math.isfinite(scale) or scale == 0.0:
        raise ValidationError(
            f"the LoRA scale is {scale}: an adapter with alpha 0 cannot carry the mitigation"
        )
    u = u.to(work_dtype(u))
    g = u.mT @ w_ft.to(u)  # (d, n) = diag(s) V^T
    s = torch.linalg.vector_norm(g, dim=1)
    if bool((s <= 0).any()):
        raise ValidationError("an intruder direction has singular value 0: nothing to scale")
    c = (1.0 - check_lambda(lam)) * s / abs(scale)
    sign = -1.0 if scale > 0 else 1.0
    b_add = sign * u * c.sqrt()
    a_add = (c.sqrt() / s)[:, None] * g
    a2 = torch.cat([a.to(u), a_add], dim=0)
    b2 = torch.cat([b.to(u), b_add], dim=1)
    return a2, b2


def refit_factors(
    w_base: torch.Tensor, w_mitigated: torch.Tensor, rank: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT 0.21.2 ``reduce_intruder_dimension``'s new factors: the top-`rank` SVD of
    ``(W' - W_0) / scale``, ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) Vh_r`` (float64 here; PEFT
    computes in the weights' dtype, float32 for a float32 model)."""
    if not math.isfinite(scale) or scale == 0.0:
        raise ValidationError(f"the LoRA scale is {scale}: cannot refit a rank-r adapter")
    dtype = work_dtype(w_base)
    dw = (w_mitigated.to(dtype) - w_base.to(dtype)) / scale
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    root = s[:rank].sqrt()
    return root[None, :] * u[:, :rank], root[:, None] * vh[:rank]


def new_alpha(scale: float, rank: int, *, rslora: bool) -> float:
    """The lora_alpha that keeps `scale` at `rank`: ``scale * r`` (``scale * sqrt(r)`` rsLoRA)."""
    return scale * (math.sqrt(rank) if rslora else rank)
