"""One decomposition request applied to a batch of equal-shape matrices, as `Spectrum`s.

`SpectrumOptions` says what to compute (mode, k, method and their knobs); `decompose_batch`
runs it on a `(b, m, n)` tensor already on the compute device. Pure: no IO, no cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from spectra.errors import ValidationError
from spectra.linalg.exact import ROUTES, exact_svd, exact_svdvals, resolve_route
from spectra.linalg.rsvd import DEFAULT_TOL, RSVD_METHODS, randomized_svd_info
from spectra.linalg.spectrum import Spectrum

MODES = ("values", "topk", "full")
TOPK_METHODS = ("auto", "exact", *RSVD_METHODS)
# "auto" top-k: an exact SVD when min(m, n) <= EXACT_SHARE * (k + oversample). Measured on this
# 2-core CPU (docs/bench/engine.md), adaptive block Krylov vs float32 `torch.linalg.svd`: 1.8x
# faster at 1024^2 k=64 (ratio 14), 0.4x at 1024^2 k=256 (ratio 3.8), 0.9x at 2048^2 k=256
# (7.7), 2.1x at 2048x5504 k=256 (7.7). Exact is also exact, so ties go to it.
EXACT_SHARE = 6


@dataclass(frozen=True)
class SpectrumOptions:
    """What to compute per matrix.

    mode: "values" (all singular values), "topk" (top-k values and vectors), "full" (full SVD).
    k: number of components for "topk" (clamped to min(m, n) per matrix).
    route: exact-values route for "values" ("auto" | "svdvals" | "gram64").
    method: top-k method ("auto" | "krylov" | "subspace" | "exact").
    oversample, power_iters, tol, max_iters, seed: randomized SVD knobs (see rsvd.py).
    dtype: working precision; None = float32 for "values"/"topk", float64 for "full".
    """

    mode: str = "values"
    k: int | None = None
    route: str = "auto"
    method: str = "auto"
    oversample: int = 10
    power_iters: int | None = None
    tol: float = DEFAULT_TOL
    max_iters: int | None = None
    seed: int = 0
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValidationError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.route not in ROUTES:
            raise ValidationError(f"route must be one of {ROUTES}, got {self.route!r}")
        if self.method not in TOPK_METHODS:
            raise ValidationError(f"method must be one of {TOPK_METHODS}, got {self.method!r}")
        if self.mode == "topk" and (
            isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1
        ):
            raise ValidationError(f"mode 'topk' needs an integer k >= 1, got k={self.k!r}")
        if self.dtype not in (None, torch.float32, torch.float64):
            raise ValidationError(f"dtype must be torch.float32/float64 or None, got {self.dtype}")

    def work_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return torch.float64 if self.mode == "full" else torch.float32

    def topk_method(self, shape: tuple[int, int]) -> str:
        """The concrete top-k method for a matrix of `shape`."""
        if self.method != "auto":
            return self.method
        k = min(int(self.k or 1), *shape)
        return "exact" if (k + self.oversample) * EXACT_SHARE >= min(shape) else "krylov"

    def params(self, shape: tuple[int, int], device: torch.device) -> dict[str, Any]:
        """JSON-safe parameters that determine the result for `shape` (the cache key's part)."""
        out: dict[str, Any] = {"mode": self.mode, "dtype": str(self.work_dtype())}
        if self.mode == "values":
            out["route"] = resolve_route(self.route, device)
            if out["route"] == "gram64":
                out.pop("dtype")  # gram64 is float64 whatever the working dtype
        elif self.mode == "topk":
            method = self.topk_method(shape)
            out.update(method=method, k=min(int(self.k or 1), *shape))
            if method != "exact":
                out.update(
                    oversample=self.oversample,
                    power_iters=self.power_iters,
                    tol=self.tol,
                    max_iters=self.max_iters,
                    seed=self.seed,
                )
        return out

    def bytes_per_matrix(self, shape: tuple[int, int]) -> int:
        """Estimated peak working memory (bytes) for one matrix of `shape`, input included."""
        m, n = shape
        M = min(m, n)
        item = 8 if self.work_dtype() == torch.float64 else 4
        if self.mode == "values":
            return 12 * m * n + 16 * M * M
        if self.mode == "full":
            return 4 * m * n + 3 * item * m * n + 2 * item * M * (m + n)
        width = min(int(self.k or 1) + self.oversample, M)
        basis = min(M, width * 17)
        return 4 * m * n + item * m * n + 3 * 8 * (m + n) * basis + 8 * basis * basis


def decompose_batch(
    W: torch.Tensor,
    opts: SpectrumOptions,
    *,
    names: Sequence[str] | None = None,
) -> list[Spectrum]:
    """Spectra of each matrix of `W (b, m, n)` per `opts`; a matrix with NaN/Inf entries gets a
    failed Spectrum (message says how many), the others are computed. Values and vectors come
    back on the CPU; values float64."""
    b, m, n = W.shape
    finite = torch.isfinite(W).flatten(1).all(dim=1).cpu()
    out: list[Spectrum | None] = [None] * b
    for i in (~finite).nonzero().flatten().tolist():
        bad = int((~torch.isfinite(W[i])).sum())
        name = names[i] if names else f"batch index {i}"
        out[i] = Spectrum.failed(
            (m, n), f"{name}: {bad} NaN/Inf entries of {m * n}; not decomposed"
        )
    good = finite.nonzero().flatten()
    if good.numel():
        Wg = W if good.numel() == b else W[good.to(W.device)]
        for i, spec in zip(good.tolist(), _decompose_finite(Wg, opts), strict=True):
            out[i] = spec
    return [s for s in out if s is not None]


def _decompose_finite(W: torch.Tensor, opts: SpectrumOptions) -> list[Spectrum]:
    shape = (int(W.shape[1]), int(W.shape[2]))
    params = opts.params(shape, W.device)
    if opts.mode == "values":
        S = exact_svdvals(W, route=params["route"], dtype=opts.work_dtype()).cpu()
        return [
            Spectrum(S[i].clone(), None, None, params["route"], params, shape=shape)
            for i in range(len(S))
        ]
    if opts.mode == "full" or params["method"] == "exact":
        U, S, Vh = exact_svd(W, dtype=opts.work_dtype())
        if opts.mode == "topk":
            k = params["k"]
            U, S, Vh = U[..., :k], S[..., :k], Vh[..., :k, :]
        U, S, Vh = U.cpu(), S.double().cpu(), Vh.cpu()
        return [
            Spectrum(S[i].clone(), U[i].clone(), Vh[i].clone(), "svd", params, shape=shape)
            for i in range(len(S))
        ]
    res = randomized_svd_info(
        W,
        params["k"],
        oversample=opts.oversample,
        power_iters=opts.power_iters,
        method=params["method"],
        seed=opts.seed,
        tol=opts.tol,
        max_iters=opts.max_iters,
        dtype=opts.work_dtype(),
    )
    U, S, Vh = res.U.cpu(), res.S.double().cpu(), res.Vh.cpu()
    return [
        Spectrum(
            S[i].clone(),
            U[i].clone(),
            Vh[i].clone(),
            f"rsvd-{params['method']}",
            params,
            residual=float(res.residual[i]),
            shape=shape,
            converged=bool(res.converged[i]),
            iterations=int(res.iterations[i]),
        )
        for i in range(len(S))
    ]
