"""SVD smoothing and sharpening of one matrix (WeightWatcher 0.7.7's `SVDSmoothing` and
`SVDSharpness`; docs/methods.md section 2e). Pure: tensors in, tensors out.

Smoothing keeps the top `k` singular components of `W = U diag(S) Vh` and drops the rest,
`W_k = U[:, :k] diag(S[:k]) Vh[:k]` (the best rank-k approximation, Eckart-Young); sharpening
drops the top `k` and keeps the rest, `W - W_k`. How `k` is chosen is WeightWatcher's
(`kept_components`):

- ``"detx"`` (its default): the detX tail of the ESD (analysis/detx.py);
- ``"lambda_min"``: the power-law tail, `num_pl_spikes` of the default fit (analysis/powerlaw.py);
- ``"rmt"``: the eigenvalues above the Marchenko-Pastur bulk edge (+ Tracy-Widom margin), by the
  given MP fit;
- ``"svd"``: a share of the components, `int(percent * M)`, `M = min(m, n)`.

Sharpening (`sharpen_components`) drops as many top components as the *shuffled* matrix's ESD has
spikes past the MP bulk (WeightWatcher's `apply_svd_sharpness`: shuffle, MP fit, then chomp that
many top components off the unshuffled W). A count of 0 leaves the matrix as it is (so does
WeightWatcher: "Not smoothing ... ncomp=0").

WeightWatcher computes the kept part with scikit-learn's randomized `TruncatedSVD` (7 power
iterations, random_state 42) on CPU; here every component comes from one exact SVD in float64, so
the result is the exact truncation (methods.md section 2e measures the difference).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from spectra.analysis.detx import detx_constraint
from spectra.analysis.mp import MPFit
from spectra.analysis.powerlaw import fit_powerlaw
from spectra.analysis.randomized import shuffle_entries
from spectra.errors import ValidationError

SMOOTH_METHODS = ("detx", "lambda_min", "rmt", "svd")
DEFAULT_PERCENT = 0.8  # WeightWatcher's SVDSmoothing(percent=0.8), used by method "svd" only
MpFit = Callable[[np.ndarray, tuple[int, int]], MPFit | None]

Svd = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def exact_svd64(W: torch.Tensor) -> Svd:
    """Thin SVD of `W (m, n)` in float64 (float32 on mps, which has no float64) on W's device:
    `U (m, M)`, `S (M,)` descending, `Vh (M, n)`."""
    dtype = torch.float32 if W.device.type == "mps" else torch.float64
    if not bool(torch.isfinite(W).all()):
        raise ValidationError("the matrix holds NaN or infinite values: nothing to decompose")
    U, S, Vh = torch.linalg.svd(W.to(dtype), full_matrices=False)
    return U, S, Vh


def kept_components(
    S: np.ndarray, shape: tuple[int, int], method: str, *, percent: float, mp_fit: MpFit
) -> int:
    """How many top components smoothing keeps (module docstring); `S` (M,) singular values.
    0 means "leave the matrix as it is" (no tail found, or a share below one component)."""
    evals = np.asarray(S, dtype=np.float64) ** 2
    big_m = evals.size
    if method == "svd":
        return min(big_m, int(percent * big_m))
    if method == "detx":
        found = detx_constraint(evals)
        return 0 if found is None else found.num
    if method == "lambda_min":
        fit = fit_powerlaw(evals)
        return fit.num_spikes if fit.ok else 0
    if method == "rmt":
        mp = mp_fit(evals, shape)
        return 0 if mp is None else mp.num_spikes
    raise ValidationError(f"method must be one of {', '.join(SMOOTH_METHODS)}, got {method!r}")


def sharpen_components(W: torch.Tensor, *, seed: int, mp_fit: MpFit) -> int:
    """How many top components sharpening drops: the spikes of the ESD of `W (m, n)` (float64
    for exact spectra) with its entries shuffled (seeded: analysis/randomized.py), past the MP
    fit's bulk edge."""
    S = torch.linalg.svdvals(shuffle_entries(W, seed=seed)).double().cpu().numpy()
    mp = mp_fit(S**2, (int(W.shape[0]), int(W.shape[1])))
    return 0 if mp is None else mp.num_spikes


def keep_top(svd: Svd, k: int) -> torch.Tensor:
    """`U[:, :k] diag(S[:k]) Vh[:k]`: the top k components."""
    U, S, Vh = svd
    return (U[:, :k] * S[:k]) @ Vh[:k]


def drop_top(svd: Svd, k: int) -> torch.Tensor:
    """`U[:, k:] diag(S[k:]) Vh[k:]`: everything but the top k components (summed directly, not
    as `W - W_k`, so the small components keep their own precision)."""
    U, S, Vh = svd
    return (U[:, k:] * S[k:]) @ Vh[k:]
