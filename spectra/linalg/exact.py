"""Exact spectra of batches of equal-shape matrices: `svdvals`, float64 Gram eigenvalues, full SVD.

Routes (../shared/docs/methods.md section 1):
- "svdvals": `torch.linalg.svdvals` in the working precision (float32 for low-precision inputs).
  Absolute error about `eps * S_1`: in float32 the small singular values of the bulk are off.
- "gram64": eigenvalues of the float64 Gram matrix of the smaller side (`W^T W` or `W W^T`),
  clamped at 0, square-rooted, descending. Squaring doubles the exponent range but float64 keeps
  the absolute eigenvalue error near `eps64 * S_1^2`, so every eigenvalue `S_i^2` above the 1e-5
  cut used by the power-law fits is exact to ~1e-9 relative for `S_1` of order 10. On a 2-core CPU
  it is about 2x faster than float32 `svdvals`.
- "auto": gram64, except on devices without float64 (MPS), where it is svdvals.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spectra.errors import ValidationError
from spectra.linalg.checks import as_batch, check_finite, check_names, work_dtype

ROUTES = ("auto", "svdvals", "gram64")


def resolve_route(route: str, device: torch.device) -> str:
    """The concrete route ("svdvals" or "gram64") that `route` means on `device`."""
    if route not in ROUTES:
        raise ValidationError(f"route must be one of {ROUTES}, got {route!r}")
    if route != "auto":
        return route
    return "svdvals" if device.type == "mps" else "gram64"


def exact_svdvals(
    W: torch.Tensor,
    *,
    route: str = "auto",
    dtype: torch.dtype | None = None,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """All singular values of `W (m, n)` or `W (b, m, n)`: `S (.., min(m, n))`, float64,
    descending, on W's device.

    route: "auto" | "svdvals" | "gram64" (see the module docstring for accuracy and speed).
    dtype: working precision of the "svdvals" route (float32 or float64; default float32 for
        low-precision inputs, W's own otherwise). "gram64" always works in float64.

    >>> W = torch.diag(torch.tensor([3.0, 1.0, 2.0]))
    >>> exact_svdvals(W).tolist()
    [3.0, 2.0, 1.0]
    """
    Wb, single = as_batch(W)
    check_names(names, Wb.shape[0])
    check_finite(Wb, names)
    chosen = resolve_route(route, Wb.device)
    if chosen == "gram64":
        S = gram_svdvals(Wb)
    else:
        S = torch.linalg.svdvals(Wb.to(work_dtype(Wb, dtype))).double()
    return S[0] if single else S


def gram_svdvals(W: torch.Tensor) -> torch.Tensor:
    """`(b, min(m, n))` float64 singular values from the eigenvalues of the smaller Gram matrix
    of `W (b, m, n)` (no validation: callers check)."""
    W64 = W.double()
    m, n = W64.shape[-2:]
    G = W64.mT @ W64 if m >= n else W64 @ W64.mT  # (b, M, M)
    ev = torch.linalg.eigvalsh(G)  # ascending
    return ev.clamp_min(0).sqrt().flip(-1)


def exact_svd(
    W: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    full_matrices: bool = False,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full SVD `W = U diag(S) Vh` of `W (m, n)` or a batch, computed in `dtype` (default
    float64): `U (.., m, M)`, `S (.., M)` descending, `Vh (.., M, n)` with `M = min(m, n)`
    (`full_matrices=True` gives square `U`, `Vh`). Intruder detection needs the full base `U`,
    MiLoRA the bottom components; a randomized top-k serves neither.

    >>> U, S, Vh = exact_svd(torch.eye(3) * 2)
    >>> S.tolist()
    [2.0, 2.0, 2.0]
    """
    Wb, single = as_batch(W)
    check_names(names, Wb.shape[0])
    check_finite(Wb, names)
    U, S, Vh = torch.linalg.svd(Wb.to(work_dtype(Wb, dtype)), full_matrices=full_matrices)
    if single:
        return U[0], S[0], Vh[0]
    return U, S, Vh
