"""Intruder dimensions between a fine-tuned matrix and its base (pure tensor functions).

Shuttleworth, Andreas, Torralba, Sharma, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", arXiv 2410.21228. Definition (methods.md section 3): take the top-k left singular
vectors of the fine-tuned matrix W_t (by singular value); for each, its maximum absolute cosine
similarity against *all* left singular vectors of the base W_0; it is an intruder when that
maximum is below epsilon. Paper defaults: k = 10, epsilon = 0.5.

Floor: against a complete orthonormal basis of R^m, max |cos| >= 1/sqrt(m) for every unit vector
(the squared cosines sum to 1). With a thin base U of a tall matrix (m > n, U is (m, n)) the
base's left singular vectors span only its column space and a vector outside it can score below
that floor (down to 0); we use the thin U (as full_matrices=False does), and record the floor
and the basis width so a reader can tell the two cases apart.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from spectra.errors import ValidationError

DEFAULT_K = 10  # the paper's k
DEFAULT_EPSILONS = (0.5,)  # the paper's epsilon; sweeps over 0.5-0.9 are common
SWEEP_EPSILONS = (0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class IntruderResult:
    """Intruder dimensions of one matrix pair.

    max_cos: (k,) max |cos| of each top-k fine-tuned left singular vector against the base's
      left singular vectors, in the fine-tune's singular-value order (largest first).
    counts: {epsilon: number of top-k vectors with max_cos < epsilon}.
    floor: 1/sqrt(m), the least max_cos possible against a complete basis of R^m.
    basis_size: number of base left singular vectors used (m when complete, n for a tall thin U).
    """

    max_cos: tuple[float, ...]
    counts: dict[float, int] = field(default_factory=dict)
    floor: float = 0.0
    basis_size: int = 0

    @property
    def k(self) -> int:
        return len(self.max_cos)

    def count(self, epsilon: float) -> int:
        """Intruder count at `epsilon` (must be one of the epsilons computed)."""
        for eps, n in self.counts.items():
            if math.isclose(eps, epsilon, rel_tol=0, abs_tol=1e-12):
                return n
        raise ValidationError(
            f"epsilon {epsilon} was not computed; available: {sorted(self.counts)}"
        )

    def intruder_indices(self, epsilon: float) -> tuple[int, ...]:
        """Positions (0 = top singular vector) of the intruders at `epsilon`."""
        return tuple(i for i, c in enumerate(self.max_cos) if c < epsilon)

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "max_cos": list(self.max_cos),
            "counts": {epsilon_key(e): n for e, n in self.counts.items()},
            "floor": self.floor,
            "basis_size": self.basis_size,
        }


def epsilon_key(eps: float) -> str:
    """Stable JSON key for an epsilon: '0.5', '0.75'."""
    return f"{eps:g}"


def validate_epsilons(epsilons: Iterable[float]) -> tuple[float, ...]:
    """Sorted, de-duplicated epsilons in (0, 1]; raises ValidationError otherwise."""
    try:
        values = sorted({float(e) for e in epsilons})
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"epsilons must be numbers, got {epsilons!r}") from exc
    if not values:
        raise ValidationError("give at least one epsilon, e.g. 0.5")
    bad = [e for e in values if not 0.0 < e <= 1.0]
    if bad:
        raise ValidationError(f"epsilon must be in (0, 1]: got {bad}; the paper uses 0.5 to 0.9")
    return tuple(values)


def max_abs_cosine(u_ft_topk: torch.Tensor, u_base: torch.Tensor) -> torch.Tensor:
    """Max |cos| of each column of `u_ft_topk` (m, k) against the columns of `u_base` (m, M).

    Both are orthonormal-column matrices (singular vectors are unit norm, so the cosine is the
    inner product). Returns (k,) float64 in [0, 1]. Cost: one (M, m) x (m, k) product.
    """
    if u_ft_topk.ndim != 2 or u_base.ndim != 2:
        raise ValidationError(
            f"expected 2-D singular-vector matrices, got shapes {tuple(u_ft_topk.shape)} and "
            f"{tuple(u_base.shape)}"
        )
    if u_ft_topk.shape[0] != u_base.shape[0]:
        raise ValidationError(
            f"row counts differ: fine-tuned U is {tuple(u_ft_topk.shape)}, base U is "
            f"{tuple(u_base.shape)}; both must be left singular vectors of (m, n) matrices"
        )
    dtype = torch.float64 if u_base.device.type != "mps" else torch.float32
    sims = u_base.to(dtype).mT @ u_ft_topk.to(device=u_base.device, dtype=dtype)  # (M, k)
    return sims.abs().amax(dim=0).clamp(max=1.0).cpu().to(torch.float64)


def intruder_dimensions(
    u_ft_topk: torch.Tensor,
    u_base: torch.Tensor,
    epsilons: Iterable[float] = DEFAULT_EPSILONS,
) -> IntruderResult:
    """Intruder dimensions of a fine-tuned matrix against its base (arXiv 2410.21228).

    u_ft_topk: (m, k) top-k left singular vectors of W_t, largest singular value first.
    u_base: (m, M) all left singular vectors of W_0 (M = m for a complete basis; thin U
      otherwise; see the module docstring on the 1/sqrt(m) floor).
    epsilons: thresholds; every count comes from the same max-cos values (one pass).

    >>> import torch
    >>> u = torch.eye(4, dtype=torch.float64)
    >>> intruder_dimensions(u[:, :2], u, (0.5,)).counts
    {0.5: 0}
    """
    eps = validate_epsilons(epsilons)
    mc = max_abs_cosine(u_ft_topk, u_base)  # (k,)
    counts = {e: int((mc < e).sum().item()) for e in eps}
    m = int(u_base.shape[0])
    return IntruderResult(
        max_cos=tuple(float(x) for x in mc.tolist()),
        counts=counts,
        floor=1.0 / math.sqrt(m),
        basis_size=int(u_base.shape[1]),
    )


# The name used in docs/architecture.md's interface list.
intruders = intruder_dimensions
