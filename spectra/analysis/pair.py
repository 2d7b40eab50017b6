"""One matrix pair compared (pure, float64): intruders, update statistics, drift, alpha.

`compare_pair(w_base, w_ft | lora=(A, B, scale))` -> `PairResult`. Definitions: methods.md
section 3 and the docstrings of spectra.analysis.intruders / drift / forensics.

Memory: the inputs stay in the dtype they come in (the compare job reads them as stored, or as
float32); everything is computed in float64 from exact upcasts of slices, so a pair's working
memory is its two inputs, one float64 `m x min(m, n)` array (the QR buffer of a tall matrix,
which becomes the base's U; or the base's U from the cache), a few float64 `M x M` matrices
and float64 slices of at most GRAM_SLICE_BYTES (spectra.linalg.exact). The fine-tune's top
vectors are taken before the base's full U, so the two QR buffers never coexist.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from spectra.analysis.drift import (
    SubspaceDrift,
    UpdateStats,
    left_singular,
    lowrank_update_svd,
    subspace_drift,
    update_stats,
    update_svdvals_between,
)
from spectra.analysis.forensics import UNCHANGED_TOL, classify_update
from spectra.analysis.intruders import (
    DEFAULT_EPSILONS,
    DEFAULT_K,
    IntruderResult,
    intruder_dimensions,
)
from spectra.analysis.powerlaw import fit_powerlaw
from spectra.errors import NumericalError, ValidationError
from spectra.linalg.checks import all_finite
from spectra.linalg.decompose import nonfinite_counts
from spectra.linalg.exact import GRAM_SLICE_BYTES

LoraFactors = tuple[torch.Tensor, torch.Tensor, float]  # A (r, n), B (m, r), scale
BaseSvd = tuple[torch.Tensor, torch.Tensor]  # U (m, M), S (M,) of the base matrix


@dataclass(frozen=True)
class PairResult:
    """Everything compare() measures on one matrix pair (base key names the pair)."""

    key: str
    ft_key: str
    role: str
    layer: int | None
    shape: tuple[int, int]
    kind: str  # 'unchanged' | 'low-rank' | 'full-rank' (forensics.classify_update)
    intruders: IntruderResult
    update: UpdateStats
    drift: SubspaceDrift
    alpha_base: float | None
    alpha_ft: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "ft_key": self.ft_key,
            "role": self.role,
            "layer": self.layer,
            "shape": list(self.shape),
            "kind": self.kind,
            "intruders": self.intruders.to_dict(),
            "update": self.update.to_dict(),
            "drift": self.drift.to_dict(),
            "alpha_base": self.alpha_base,
            "alpha_ft": self.alpha_ft,
        }

    def row(self) -> dict[str, Any]:
        """Flat CSV row: one column per epsilon count, scalars only."""
        u = self.update
        row: dict[str, Any] = {
            "key": self.key,
            "ft_key": self.ft_key,
            "role": self.role,
            "layer": self.layer,
            "shape": f"{self.shape[0]}x{self.shape[1]}",
            "kind": self.kind,
        }
        for eps_key, n in self.intruders.to_dict()["counts"].items():
            row[f"intruders@{eps_key}"] = n
        row.update(
            min_max_cos=min(self.intruders.max_cos) if self.intruders.max_cos else None,
            rel_change=u.rel_change,
            numerical_rank=u.numerical_rank,
            stable_rank=u.stable_rank,
            effective_rank=u.effective_rank,
            energy_rank=u.energy_rank,
            energy_topk=u.energy_topk,
            dw_spectral_norm=u.spectral_norm,
            drift_min_cos=self.drift.min_cos,
            drift_mean_cos=self.drift.mean_cos,
            alpha_base=self.alpha_base,
            alpha_ft=self.alpha_ft,
        )
        return row


def _alpha(s: torch.Tensor) -> float | None:
    fit = fit_powerlaw((s.detach().to("cpu", torch.float64) ** 2).numpy())
    return fit.alpha if fit.ok else None


@dataclass(frozen=True)
class PairMeta:
    """Names of one pair (no tensors)."""

    key: str
    ft_key: str
    role: str = "other"
    layer: int | None = None


def compare_pair(
    w_base: torch.Tensor,
    w_ft: torch.Tensor | None = None,
    *,
    lora: LoraFactors | None = None,
    meta: PairMeta | None = None,
    k: int = DEFAULT_K,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    unchanged_tol: float = UNCHANGED_TOL,
    base_svd: BaseSvd | Callable[[], BaseSvd | None] | None = None,
) -> PairResult:
    """Compare one fine-tuned matrix with its base (pure; computed in float64).

    w_base: (m, n), any floating dtype (bf16, fp16, float32, float64: upcast exactly, slice by
    slice). Exactly one of `w_ft` (m, n), or `lora` = (A (r, n), B (m, r), scale) with
    W_ft = W_base + scale * B @ A (then dW's spectrum comes from the factors).
    base_svd: optional precomputed (U (m, M), S (M,)) of w_base (e.g. from a cache), or a
    function returning it or None, called after the fine-tune's vectors are taken (so a cached
    U is not held during the fine-tune's QR).
    k is capped at min(m, n).
    """
    if (w_ft is None) == (lora is None):
        raise ValidationError("compare_pair needs exactly one of w_ft or lora factors")
    meta = meta or PairMeta(key="W", ft_key="W")
    shape = (int(w_base.shape[0]), int(w_base.shape[1]))
    sides = [("the base matrix", meta.key, w_base)]
    sides += [("the fine-tuned matrix", meta.ft_key, w_ft)] if w_ft is not None else []
    sides += [("the LoRA factor of", meta.ft_key, t) for t in lora[:2]] if lora is not None else []
    _check_finite(sides)
    dtype = torch.float32 if w_base.device.type == "mps" else torch.float64
    w0 = w_base
    if lora is not None:
        a, b, scale = lora
        _check_factors(a, b, shape, meta.key)
        u_dw, s_dw, _ = lowrank_update_svd(a.to(w0.device), b.to(w0.device), scale)
        w1 = _merged(w0, a, b, float(scale), dtype)  # formed for intruder detection only
    else:
        w1 = w_ft.to(device=w0.device)  # type: ignore[union-attr]
        if tuple(w1.shape) != shape:
            raise ValidationError(f"{meta.key}: base is {shape}, fine-tune is {tuple(w1.shape)}")
        s_dw = update_svdvals_between(w0, w1)
    kk = min(k, min(shape))
    u1, s1 = left_singular(w1, top=kk)
    del w1
    given = base_svd() if callable(base_svd) else base_svd
    # U in whichever layout it comes (column-major from the QR, row-major from the cache): the
    # products below are layout-independent in their bits (tested), so no copy of U is made.
    u0, s0 = given if given is not None else left_singular(w0)
    update = update_stats(s_dw, shape=shape, base_fro=_fro(w0, dtype), k=kk)
    intr = intruder_dimensions(u1[:, :kk], u0.to(u1), epsilons)
    return PairResult(
        key=meta.key,
        ft_key=meta.ft_key,
        role=meta.role,
        layer=meta.layer,
        shape=shape,
        kind=classify_update(update, unchanged_tol=unchanged_tol),
        intruders=intr,
        update=update,
        drift=subspace_drift(u0[:, :kk].to(u1), u1[:, :kk]),
        alpha_base=_alpha(s0),
        alpha_ft=_alpha(s1),
    )


def pair_working_bytes(shape: tuple[int, int], itemsize: int, *, lora: bool = False) -> int:
    """compare's working memory for one (m, n) pair, the process's fixed cost aside: both sides
    as read (`itemsize` bytes per entry; a LoRA fine-tune adds its float64 merge), one float64
    `m x M` array (M = min(m, n): the QR buffer of a tall matrix that becomes the base's U, or
    the base's U itself), six float64 `M x M` (R, the Gram matrix, eigh's copy, its workspace
    (LAPACK syevd: 2 M^2) and the ordered eigenvectors) and two float64 slices of at most
    GRAM_SLICE_BYTES. The stages that need the slices (the update's Gram matrix, the norm) hold
    no QR buffer, so this bounds every stage.

    >>> round(pair_working_bytes((32000, 2048), 2) / 2**20)  # a bf16 embedding pair
    1070
    """
    m, n = (int(x) for x in shape)
    M = min(m, n)
    sides = 2 * itemsize * m * n + (8 * m * n if lora else 0)
    return sides + 8 * m * M + 6 * 8 * M * M + 2 * min(GRAM_SLICE_BYTES, 8 * m * n)


def _rows_per_slice(n: int) -> int:
    """Rows of an (m, n) matrix in one float64 slice of at most GRAM_SLICE_BYTES."""
    return max(1, GRAM_SLICE_BYTES // (8 * max(1, n)))


def _fro(w: torch.Tensor, dtype: torch.dtype) -> float:
    """||w||_F in `dtype`: one reduction of the upcast matrix when it fits one slice (the bits of
    `torch.linalg.norm(w.to(dtype))`), else the root of the summed squares of row slices."""
    step = _rows_per_slice(int(w.shape[1]))
    if w.shape[0] <= step:
        return float(torch.linalg.norm(w.to(dtype)))
    total = sum(
        float(torch.linalg.norm(w[i : i + step].to(dtype))) ** 2 for i in range(0, w.shape[0], step)
    )
    return total**0.5


def _merged(
    w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype
) -> torch.Tensor:
    """W_base + scale * B @ A in `dtype`, formed by row slices (the bits of the whole-matrix
    expression: each row of B @ A is its own product)."""
    a, b = a.to(device=w0.device, dtype=dtype), b.to(device=w0.device, dtype=dtype)
    out = torch.empty(tuple(w0.shape), dtype=dtype, device=w0.device)
    step = _rows_per_slice(int(w0.shape[1]))
    for i in range(0, w0.shape[0], step):
        out[i : i + step] = w0[i : i + step].to(dtype) + scale * (b[i : i + step] @ a)
    return out


def _check_finite(sides: Sequence[tuple[str, str, torch.Tensor]]) -> None:
    """One-line NumericalError for the first side with NaN/Inf entries: no decomposition of it
    means anything, and the user can leave the matrix out."""
    for what, key, t in sides:
        if not all_finite(t):
            name = key if len(key) <= 200 else key[:197] + "..."
            raise NumericalError(
                f"{what} {name} has {nonfinite_counts(t)}: its spectrum is undefined; leave it "
                f"out with --exclude '{name}' (or fix the checkpoint)"
            )


def _check_factors(a: torch.Tensor, b: torch.Tensor, shape: tuple[int, int], key: str) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise ValidationError(
            f"{key}: LoRA factors must be A (r, in), B (out, r); got A {tuple(a.shape)}, "
            f"B {tuple(b.shape)}"
        )
    if (b.shape[0], a.shape[1]) != shape:
        raise ValidationError(
            f"{key}: LoRA update is {(b.shape[0], a.shape[1])} but the base matrix is {shape}; "
            "is this adapter for another base model?"
        )
