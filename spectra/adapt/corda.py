"""CorDA: context-oriented decomposition with the input covariance of calibration data.

Yang et al. 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models",
arXiv 2406.05223 (methods.md section 4). For ``W (out, in)`` and the covariance of its inputs
``C = X^T X / tokens (in, in)``:

1. damp: ``C_d = C + d * mean(diag C) * I`` with ``d = 0.01`` doubled until
   ``||C_d C_d^{-1} - I||_F < 0.05`` (Frobenius norm, computed in float64);
2. ``U, S, Vh = svd(W C_d)`` (float64); ``V' = (Vh C_d^{-1})^T (in, k)`` so
   ``W = U diag(S) V'^T`` exactly (up to float64 rounding of the inverse);
3. IPM (instruction-previewed mode) keeps the largest r components, KPM (knowledge-preserving
   mode) the smallest r; ``A = diag(sqrt(S_r / s)) V'^T_r``, ``B = U_r diag(sqrt(S_r / s))``; the
   caller computes the residual ``W - s B A`` by subtraction.

Differences from PEFT's ``preprocess_corda`` on purpose: the covariance is normalized by the
number of real (unpadded) tokens, so any batch size gives the same C; PEFT divides each sample's
input by its own max |x| and averages over forward calls, which needs batch size 1.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from spectra.adapt.factorize import factorize
from spectra.adapt.registry import Factors, InitContext, register_initializer
from spectra.adapt.stats import CalibrationStats
from spectra.errors import NumericalError, ValidationError

CordaMode = Literal["ipm", "kpm"]
DAMP_START = 0.01  # CorDA's reference code and PEFT start here
INVERSE_TOLERANCE = 0.05  # ||C_d C_d^-1 - I||_F must fall below this
MAX_DOUBLINGS = 60


@dataclass(frozen=True)
class CordaDecomposition:
    """``W = U diag(S) V'^T`` with ``U (out, k)``, ``S (k,)`` descending, ``Vp (in, k)``, float64.

    damp: the damping factor d finally used; inverse_error: ``||C_d C_d^-1 - I||_F``.
    """

    U: Tensor
    S: Tensor
    Vp: Tensor
    damp: float
    inverse_error: float


def damped_inverse(C: Tensor) -> tuple[Tensor, Tensor, float, float]:
    """``(C_d, C_d^{-1}, d, err)`` with the smallest ``d = 0.01 * 2^j`` reaching err < 0.05.

    ``C (n, n)`` symmetric positive semi-definite; computed in float64; err is the Frobenius norm
    of ``C_d C_d^{-1} - I``.
    """
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValidationError(f"covariance must be square (n, n), got {tuple(C.shape)}")
    C = C.to(torch.float64)
    if not bool(torch.isfinite(C).all()):
        raise NumericalError("the input covariance has NaN/Inf entries: check the calibration data")
    eye = torch.eye(C.shape[0], dtype=torch.float64, device=C.device)
    level = float(C.diagonal().mean())
    if level <= 0:
        if not bool(C.any()):
            raise NumericalError("the input covariance is zero: the layer saw only zero inputs")
        raise NumericalError(
            f"the input covariance has a mean diagonal of {level:.3g} <= 0, so it is no "
            "covariance (X^T X has a non-negative diagonal): recompute the calibration statistics"
        )
    damp, err = DAMP_START, math.inf
    for _ in range(MAX_DOUBLINGS):
        C_d = C + damp * level * eye
        inv, info = torch.linalg.inv_ex(C_d)  # info > 0: exactly singular, so damp more
        if int(info) == 0:
            err = float(torch.linalg.matrix_norm(C_d @ inv - eye))
            if err < INVERSE_TOLERANCE:
                return C_d, inv, damp, err
        damp *= 2
    raise NumericalError(
        f"could not invert the damped input covariance ({C.shape[0]} x {C.shape[0]}) after "
        f"{MAX_DOUBLINGS} doublings of the damping (last d = {damp / 2:.3g}, "
        f"||C_d C_d^-1 - I|| = {err:.3g}, needs < {INVERSE_TOLERANCE}): the calibration "
        "statistics are not a valid covariance; recompute them"
    )


def corda_decompose(
    W: Tensor,
    C: Tensor,
    *,
    keep: slice | None = None,
    damped: tuple[Tensor, Tensor, float, float] | None = None,
) -> CordaDecomposition:
    """CorDA's covariance-oriented SVD of ``W (out, in)`` with input covariance ``C (in, in)``.

    keep: only these components (``V'`` is then computed for them alone, saving a product).
    damped: a `damped_inverse(C)` result to reuse (q, k and v share one input covariance).

    >>> g = torch.Generator().manual_seed(0)
    >>> W = torch.randn(6, 4, generator=g, dtype=torch.float64)
    >>> X = torch.randn(100, 4, generator=g, dtype=torch.float64)
    >>> d = corda_decompose(W, X.T @ X / 100)
    >>> torch.allclose(d.U @ torch.diag(d.S) @ d.Vp.T, W)
    True
    """
    if W.ndim != 2 or C.shape != (W.shape[1], W.shape[1]):
        raise ValidationError(
            f"covariance {tuple(C.shape)} does not match W {tuple(W.shape)}: "
            f"expected ({W.shape[1]}, {W.shape[1]})"
        )
    C_d, inv, damp, err = damped if damped is not None else damped_inverse(C.to(W.device))
    W64 = W.to(torch.float64)
    U, S, Vh = torch.linalg.svd(W64 @ C_d, full_matrices=False)  # (out, k), (k,), (k, in)
    if keep is not None:
        U, S, Vh = U[:, keep], S[keep], Vh[keep]
    Vp = (Vh @ inv).T  # (in, k)
    return CordaDecomposition(U, S, Vp, damp, err)


def corda_factors(
    W: Tensor,
    C: Tensor,
    rank: int,
    scale: float,
    mode: CordaMode = "ipm",
    *,
    damped: tuple[Tensor, Tensor, float, float] | None = None,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """LoRA factors ``A (r, in)``, ``B (out, r)`` (float64) for CorDA IPM or KPM, plus facts.

    IPM: components 0..r-1 (largest S); KPM: the last r (smallest S).
    """
    if mode not in ("ipm", "kpm"):
        raise ValidationError(f"CorDA mode must be 'ipm' or 'kpm', got {mode!r}")
    k = min(int(W.shape[0]), int(W.shape[1]))
    if not 1 <= rank <= k:
        raise ValidationError(f"rank {rank} must be in [1, {k}] for W of shape {tuple(W.shape)}")
    sl = slice(0, rank) if mode == "ipm" else slice(k - rank, k)
    dec = corda_decompose(W, C, keep=sl, damped=damped)
    A, B = factorize(dec.U, dec.S, dec.Vp.T, scale)
    info = {
        "damp": dec.damp,
        "inverse_error": dec.inverse_error,
        "sigma_kept": [float(dec.S[0]), float(dec.S[-1])],
        "covariance_norm": "tokens",
    }
    return A, B, info


def _covariance(ctx: InitContext) -> Tensor:
    stats = ctx.stats
    if isinstance(stats, CalibrationStats):
        return stats.covariance(ctx.module)
    if isinstance(stats, Tensor):
        return stats
    raise ValidationError(
        f"CorDA needs the input covariance of {ctx.module}: run calibration (--calib) "
        "or pass saved statistics (--stats)"
    )


class _Corda:
    mode: ClassVar[CordaMode]
    mutates_base: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True

    def __init__(self) -> None:
        # One-entry memo: modules sharing an input (q, k, v) come one after the other and hand
        # over the same covariance tensor, so its damped inverse is computed once per group. The
        # memo follows C by weak reference and is dropped with it: at most one (in, in) pair is
        # held, and nothing outlives the caller's statistics.
        self._memo: tuple[weakref.ref, tuple[Tensor, Tensor, float, float]] | None = None

    def _damped(self, C: Tensor) -> tuple[Tensor, Tensor, float, float]:
        if self._memo is not None and self._memo[0]() is C:
            return self._memo[1]
        self._memo = None
        value = damped_inverse(C)
        self._memo = (weakref.ref(C, self._drop), value)
        return value

    def _drop(self, ref: weakref.ref) -> None:
        if self._memo is not None and self._memo[0] is ref:
            self._memo = None

    def init(self, W: Tensor, rank: int, scale: float, ctx: InitContext) -> Factors:
        C = _covariance(ctx)
        damped = tuple(t.to(W.device) if isinstance(t, Tensor) else t for t in self._damped(C))
        A, B, info = corda_factors(W, C.to(W.device), rank, scale, self.mode, damped=damped)
        return Factors(A.float(), B.float(), {"mode": self.mode, **info})


class CordaIPM(_Corda):
    name: ClassVar[str] = "corda-ipm"
    mode: ClassVar[CordaMode] = "ipm"
    description: ClassVar[str] = (
        "CorDA instruction-previewed: largest r components of W C (arXiv 2406.05223)"
    )


class CordaKPM(_Corda):
    name: ClassVar[str] = "corda-kpm"
    mode: ClassVar[CordaMode] = "kpm"
    description: ClassVar[str] = (
        "CorDA knowledge-preserving: smallest r components of W C (arXiv 2406.05223)"
    )


register_initializer(CordaIPM())
register_initializer(CordaKPM())
