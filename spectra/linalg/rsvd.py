"""Batched randomized SVD in pure torch: seeded Gaussian sketch, subspace or block Krylov iteration.

Halko, Martinsson, Tropp (2011), "Finding structure with randomness", Alg. 4.4 (randomized
subspace iteration) + Alg. 5.1 (direct SVD of the projection); Musco & Musco (2015), "Randomized
block Krylov methods for stronger and faster approximate SVD" (the default here). Every product
with `W` or `W^T` is followed by a QR re-orthonormalization.

Iteration count. `power_iters=None` (default) is adaptive: after each iteration the top-k Ritz
values (singular values of the projection, computed in float64) are compared with the previous
ones, and a matrix stops when `max_j |s_j - s_j'| / s_j <= tol`; a cap (`max_iters`) bounds the
work. No fixed count serves both the nearly flat tops of real transformer matrices (MiniLM:
S_8 / S_9 = 1.0015) and decaying spectra (methods.md section 1). Each matrix of a batch stops on
its own, so its result does not depend on what else is in the batch.

Determinism. The sketch `Omega (n, k + p)` comes from a CPU `torch.Generator` seeded with `seed`
and is the same for every matrix, so a matrix gets the same numbers whatever the batch size or
composition (bit-identical on one device and thread count; see the reproducibility contract in
docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spectra.errors import ValidationError
from spectra.linalg.checks import as_batch, check_finite, check_int, check_names, work_dtype

RSVD_METHODS = ("krylov", "subspace")
# Adaptive stop: relative change of each top-k singular value between two iterations. Ritz
# values converge from below and roughly quadratically faster than the vectors, so a tight value
# tolerance is what keeps the subspace accurate on flat spectra (measured on MiniLM, k = 16:
# 1e-5 gives a worst principal-angle cosine of 1.0000 with block Krylov, 0.999 with subspace
# iteration; see tests/test_linalg_rsvd.py and docs/bench/engine.md).
DEFAULT_TOL = 1e-5
# Caps for the adaptive mode. Block Krylov also stops when its basis spans min(m, n) columns
# (then the result is exact up to rounding).
DEFAULT_MAX_ITERS = {"krylov": 16, "subspace": 48}


@dataclass(frozen=True)
class RSVDResult:
    """Top-k factors of a batch `W (b, m, n)` and per-matrix accuracy facts.

    U (b, m, k), S (b, k) descending, Vh (b, k, n), in the working dtype on W's device.
    iterations (b,) int: iterations each matrix used; converged (b,) bool: met `tol`
    (always True for a fixed `power_iters`); residual (b,) float64:
    `||W Vh^T - U diag(S)||_F / S_1` (relative accuracy estimate; 0 for an exact top-k).
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    residual: torch.Tensor


@dataclass(frozen=True)
class RSVDOptions:
    """Knobs of the randomized SVD, validated on construction.

    oversample: extra sketch columns p (sketch width k + p, clamped to min(m, n)).
    power_iters: iterations q; None = adaptive until the top-k values change by <= `tol`
        relative (capped at `max_iters`, default 16 for krylov, 48 for subspace).
    method: "krylov" (block Krylov, Musco & Musco 2015) or "subspace" (Halko et al. Alg. 4.4).
    seed: seed of the Gaussian sketch (the same sketch for every matrix of a batch).
    tol, max_iters: the adaptive stop (see the module docstring).
    """

    oversample: int = 10
    power_iters: int | None = None
    method: str = "krylov"
    seed: int = 0
    tol: float = DEFAULT_TOL
    max_iters: int | None = None

    def __post_init__(self) -> None:
        check_int(self.oversample, "oversample", low=0)
        if self.method not in RSVD_METHODS:
            raise ValidationError(f"method must be one of {RSVD_METHODS}, got {self.method!r}")
        if self.power_iters is not None:
            check_int(self.power_iters, "power_iters", low=0)
        check_int(self.cap, "max_iters", low=0)
        if not (isinstance(self.tol, (int, float)) and 0 < self.tol < 1):
            raise ValidationError(f"tol must be a number in (0, 1), got {self.tol!r}")
        check_int(self.seed, "seed", low=0)

    @property
    def cap(self) -> int:
        """Most iterations in the adaptive mode."""
        return DEFAULT_MAX_ITERS[self.method] if self.max_iters is None else self.max_iters


def randomized_svd(
    W: torch.Tensor,
    k: int,
    options: RSVDOptions | None = None,
    *,
    dtype: torch.dtype | None = None,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k SVD of `W (m, n)` or a batch `W (b, m, n)`: returns `U (.., m, k)`, `S (.., k)`,
    `Vh (.., k, n)` with `S` descending, in float32 (or `dtype`) on W's device.

    options: the iteration knobs (RSVDOptions; default adaptive block Krylov, seed 0).
    names: optional names of the batch's matrices, used in error messages.

    >>> W = torch.randn(60, 40, dtype=torch.float64)
    >>> U, S, Vh = randomized_svd(W, 5, dtype=torch.float64)
    >>> torch.allclose(S, torch.linalg.svdvals(W)[:5])
    True
    """
    res = randomized_svd_info(W, k, options, dtype=dtype, names=names)
    if W.ndim == 2:
        return res.U[0], res.S[0], res.Vh[0]
    return res.U, res.S, res.Vh


def randomized_svd_info(
    W: torch.Tensor,
    k: int,
    options: RSVDOptions | None = None,
    *,
    dtype: torch.dtype | None = None,
    names: Sequence[str] | None = None,
) -> RSVDResult:
    """`randomized_svd` returning an `RSVDResult` (always batched) with iterations, convergence
    and residual per matrix. Arguments as in `randomized_svd`."""
    opts = RSVDOptions() if options is None else options
    Wb, _ = as_batch(W)
    b, m, n = Wb.shape
    check_names(names, b)
    k = check_int(k, "k", low=1, high=min(m, n))
    wd = work_dtype(Wb, dtype)
    check_finite(Wb, names)
    Wb = Wb.to(wd)
    width = min(k + opts.oversample, m, n)
    omega = gaussian_sketch(n, width, seed=opts.seed, dtype=wd, device=Wb.device)
    state_cls = _Krylov if opts.method == "krylov" else _Subspace
    return _run(state_cls(Wb, omega), k, opts.power_iters, float(opts.tol), opts.cap)


def gaussian_sketch(
    n: int, width: int, *, seed: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Standard Gaussian `Omega (n, width)`, generated on the CPU from `seed` (so the same on
    every device and for every batch), then moved to `device`."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(n, width, generator=gen, dtype=torch.float64).to(dtype).to(device)


def _orth(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of each `X (b, m, l)` (reduced QR)."""
    return torch.linalg.qr(X, mode="reduced").Q


def _sym_top_sqrt(G: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k square roots of the eigenvalues of symmetric `G (b, L, L)`, descending (b, k)."""
    ev = torch.linalg.eigvalsh(G).clamp_min(0).sqrt()
    return ev.flip(-1)[:, :k]


class _Subspace:
    """Working state of randomized subspace iteration (Halko et al. Alg. 4.4) for a batch."""

    def __init__(self, W: torch.Tensor, omega: torch.Tensor) -> None:
        self.W = W  # (a, m, n)
        self.Q = _orth(W @ omega)  # (a, m, l)
        self.R = W.mT @ self.Q  # (a, n, l) = B^T with B = Q^T W

    def ritz(self, k: int) -> torch.Tensor:
        R64 = self.R.double()
        return _sym_top_sqrt(R64.mT @ R64, k)

    def full(self) -> bool:
        return False

    def can_extend(self) -> bool:
        return True

    def extend(self) -> None:
        Z = _orth(self.R)  # (a, n, l)
        self.Q = _orth(self.W @ Z)
        self.R = self.W.mT @ self.Q

    def select(self, keep: torch.Tensor) -> None:
        self.W, self.Q, self.R = self.W[keep], self.Q[keep], self.R[keep]

    def factors(self, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        Ub, S, Vh = torch.linalg.svd(self.R[rows].mT, full_matrices=False)  # B (a, l, n)
        return self.Q[rows] @ Ub[..., :k], S[..., :k], Vh[..., :k, :]


class _Krylov:
    """Working state of randomized block Krylov iteration (Musco & Musco 2015) for a batch.

    Basis `Q = [Q_0, Q_1, ...] (a, m, L)` with `Q_{i+1} = orth((I - Q Q^T) W orth(W^T Q_i))`;
    `R = W^T Q (a, n, L)` is kept, so the projection `B = Q^T W = R^T` costs no extra pass, and
    the Gram `G = R^T R` (float64) gives the Ritz values for the stopping test.
    """

    def __init__(self, W: torch.Tensor, omega: torch.Tensor) -> None:
        self.W = W
        self.block = omega.shape[1]
        self.last = self.block  # width of the newest block
        self.Q = _orth(W @ omega)  # (a, m, l)
        self.R = W.mT @ self.Q  # (a, n, l)
        R64 = self.R.double()
        self.R64 = R64
        self.G = R64.mT @ R64  # (a, l, l)

    def ritz(self, k: int) -> torch.Tensor:
        return _sym_top_sqrt(self.G, k)

    def full(self) -> bool:
        """The basis has min(m, n) columns: it spans the whole range, the result is exact."""
        return self.Q.shape[-1] >= min(self.W.shape[-2:])

    def can_extend(self) -> bool:
        return not self.full()

    def extend(self) -> None:
        width = min(self.block, min(self.W.shape[-2:]) - self.Q.shape[-1])  # last may be cut
        last = self.R[..., -self.last :]  # W^T Q_i (a, n, l)
        Y = self.W @ _orth(last)[..., :width]  # (a, m, width)
        self.last = width
        for _ in range(2):  # block Gram-Schmidt, twice for stability
            Y = Y - self.Q @ (self.Q.mT @ Y)
        Qn = _orth(Y)
        # Once the basis spans W's range (a rank-deficient W), Y is rounding noise and its QR
        # amplifies the components along Q that the projection left: project the orthonormal
        # block once more, or Q loses orthogonality and the Ritz values exceed s_1.
        Qn = _orth(Qn - self.Q @ (self.Q.mT @ Qn))
        Rn = self.W.mT @ Qn  # (a, n, l)
        Rn64 = Rn.double()
        cross = self.R64.mT @ Rn64  # (a, L, l)
        top = torch.cat([self.G, cross], dim=-1)
        bottom = torch.cat([cross.mT, Rn64.mT @ Rn64], dim=-1)
        self.G = torch.cat([top, bottom], dim=-2)
        self.Q = torch.cat([self.Q, Qn], dim=-1)
        self.R = torch.cat([self.R, Rn], dim=-1)
        self.R64 = torch.cat([self.R64, Rn64], dim=-1)

    def select(self, keep: torch.Tensor) -> None:
        self.W, self.Q, self.R = self.W[keep], self.Q[keep], self.R[keep]
        self.R64, self.G = self.R64[keep], self.G[keep]

    def factors(self, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        """Rayleigh-Ritz through the float64 Gram already held: `G = B B^T = Ub S^2 Ub^T`,
        `U = Q Ub`, `V = B^T Ub S^-1 = R Ub S^-1` (top k only; cheaper than an SVD of B)."""
        ev, vec = torch.linalg.eigh(self.G[rows])  # ascending, (a, L), (a, L, L)
        top = vec[..., -k:].flip(-1)  # (a, L, k)
        S = ev[..., -k:].flip(-1).clamp_min(0).sqrt()  # (a, k)
        V = (self.R64[rows] @ top) / S.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-2)
        dt = self.Q.dtype
        return self.Q[rows] @ top.to(dt), S.to(dt), V.mT.to(dt)


def _converged(now: torch.Tensor, prev: torch.Tensor | None, tol: float) -> torch.Tensor:
    """(a,) bool: every top-k value moved by at most `tol` relative (zero matrices count)."""
    if prev is None:
        return torch.zeros(now.shape[0], dtype=torch.bool, device=now.device)
    floor = now[:, :1].clamp_min(torch.finfo(torch.float64).tiny) * 1e-30
    rel = (now - prev).abs() / torch.maximum(now, floor)
    return rel.amax(dim=-1) <= tol


def _stop_mask(
    state, k: int, it: int, power_iters: int | None, tol: float, cap: int, prev
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(done, converged, Ritz values) for the active matrices after `it` iterations."""
    a = state.W.shape[0]
    if power_iters is not None:
        done = it >= power_iters or not state.can_extend()
        ok = it >= power_iters or state.full()
        return torch.full((a,), done), torch.full((a,), ok), None
    now = state.ritz(k)
    ok = (_converged(now, prev, tol) | state.full()).cpu()
    done = ok | (it >= cap) | (not state.can_extend())
    return done, ok, now


def _run(state, k: int, power_iters: int | None, tol: float, cap: int) -> RSVDResult:
    """Iterate `state` until each matrix converges (or hits its count), collecting factors.

    Finished matrices leave the active batch, so each one's arithmetic is independent of the
    others (and of the batch size)."""
    W_all = state.W
    b = W_all.shape[0]
    active = torch.arange(b)
    out: list[tuple[torch.Tensor, ...]] = [()] * b
    iters = torch.zeros(b, dtype=torch.long)
    conv = torch.zeros(b, dtype=torch.bool)
    prev: torch.Tensor | None = None
    it = 0
    while True:
        done, ok, prev = _stop_mask(state, k, it, power_iters, tol, cap, prev)
        if bool(done.any()):
            rows = done.nonzero().flatten()
            U, S, Vh = state.factors(rows.to(W_all.device), k)
            for j, r in enumerate(rows.tolist()):
                idx = int(active[r])
                out[idx] = (U[j], S[j], Vh[j])
                iters[idx], conv[idx] = it, bool(ok[r])
            keep = (~done).nonzero().flatten()
            active = active[keep]
            if not active.numel():
                break
            state.select(keep.to(W_all.device))
            prev = None if prev is None else prev[keep.to(prev.device)]
        state.extend()
        it += 1
    U, S, Vh = (torch.stack([o[i] for o in out]) for i in range(3))
    return RSVDResult(U, S, Vh, iters, conv, _residual(W_all, U, S, Vh))


def _residual(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    """(b,) float64 `||W Vh^T - U diag(S)||_F / S_1` (one extra pass of width k)."""
    diff = W @ Vh.mT - U * S.unsqueeze(-2)  # (b, m, k)
    num = torch.linalg.matrix_norm(diff.double()).cpu()
    den = S[:, 0].double().cpu().clamp_min(torch.finfo(torch.float64).tiny)
    return num / den
