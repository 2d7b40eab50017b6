"""`Spectrum`: the singular values of one weight matrix, optional vectors, and how they were made.

Convention (named once, used everywhere): `W (m, n) = U diag(S) Vh`, `S` descending, `U (m, k)`,
`Vh (k, n)`. See docs/methods.md section 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from spectra.errors import ValidationError

METHODS = ("svdvals", "gram64", "svd", "rsvd-subspace", "rsvd-krylov", "none")
STATUSES = ("ok", "failed")


@dataclass(frozen=True)
class Spectrum:
    """Singular values (and optionally vectors) of one matrix `W (m, n)`.

    values: `S` descending, float64, on the CPU (`(k,)` for top-k results, `(min(m, n),)` for
        exact ones, empty when `status == "failed"`).
    U, Vh: `(m, k)` and `(k, n)` on the CPU, or None when only values were computed.
    method: "svdvals" | "gram64" | "svd" | "rsvd-subspace" | "rsvd-krylov" ("none" on failure).
    params: the decomposition's parameters (k, oversample, power_iters, seed, dtype, ...).
    residual: accuracy estimate of a randomized result, `||W Vh^T - U diag(S)||_F / ||S||_2`
        (relative; 0 for exact results would be meaningless, so None there).
    converged: whether an adaptive iteration met its tolerance (None for exact methods).
    iterations: power / Krylov iterations used (None for exact methods).
    status: "ok" or "failed" (e.g. NaN/Inf entries); `message` says why.
    from_cache: True when the result was loaded from the spectrum cache.
    extras: JSON-safe values computed from W while the engine held it (`compute_spectra`'s
        `extras`, e.g. `{"outlier_ratio@13.0": 0.0012}`); cached alongside the spectrum.
    """

    values: torch.Tensor
    U: torch.Tensor | None
    Vh: torch.Tensor | None
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    residual: float | None = None
    shape: tuple[int, int] = (0, 0)
    key: str | None = None
    role: str | None = None
    layer: int | None = None
    converged: bool | None = None
    iterations: int | None = None
    status: str = "ok"
    message: str = ""
    from_cache: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValidationError(f"Spectrum method {self.method!r} is not one of {METHODS}")
        if self.status not in STATUSES:
            raise ValidationError(f"Spectrum status {self.status!r} is not one of {STATUSES}")
        if self.values.ndim != 1:
            raise ValidationError(
                f"Spectrum values must be 1-D, got shape {tuple(self.values.shape)}"
            )

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def k(self) -> int:
        """Number of singular values held."""
        return int(self.values.numel())

    @property
    def eigenvalues(self) -> torch.Tensor:
        """The ESD `lambda = S^2` (float64, descending; not normalized, methods.md section 2)."""
        return self.values.square()

    def with_meta(self, *, key: str | None, role: str | None, layer: int | None) -> Spectrum:
        """A copy naming the matrix it belongs to."""
        return replace(self, key=key, role=role, layer=layer)

    @classmethod
    def failed(
        cls, shape: tuple[int, int], message: str, *, key: str | None = None, **meta: Any
    ) -> Spectrum:
        """A failed result (no values) that lets an analysis continue with the other matrices."""
        return cls(
            values=torch.empty(0, dtype=torch.float64),
            U=None,
            Vh=None,
            method="none",
            shape=shape,
            key=key,
            status="failed",
            message=message,
            **meta,
        )

    def to_dict(self, *, values: bool = True) -> dict[str, Any]:
        """JSON-safe dict without the vectors (`values=False` leaves out the values too)."""
        out: dict[str, Any] = {
            "key": self.key,
            "role": self.role,
            "layer": self.layer,
            "shape": list(self.shape),
            "method": self.method,
            "params": dict(self.params),
            "residual": _finite_or_none(self.residual),
            "converged": self.converged,
            "iterations": self.iterations,
            "status": self.status,
            "message": self.message,
            "k": self.k,
            "has_vectors": self.U is not None,
            "extras": dict(self.extras),
        }
        if values:
            out["values"] = [_finite_or_none(v) for v in self.values.tolist()]
        return out


def _finite_or_none(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
