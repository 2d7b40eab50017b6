"""Per-matrix HT-SR metrics (Martin & Mahoney, JMLR 22 (2021); arXiv 1810.01075, 2002.06716).

All definitions follow docs/methods.md section 2 (WeightWatcher 0.7.x conventions):
ESD `lambda_i = S_i^2` of `W (m, n)`, not normalized; `N = max(m, n)`, `M = min(m, n)`.

- alpha, xmin, xmax, D, sigma, num_pl_spikes: `fit_powerlaw` (powerlaw.py);
- alpha_weighted = alpha * log10(lambda_max); log_spectral_norm = log10(lambda_max);
- log_norm = log10(sum lambda); stable_rank = sum lambda / lambda_max;
- log_alpha_norm = log10(sum lambda^alpha);
- numerical_rank R = #{S_i > S_1 * N * eps}, eps = float32 machine epsilon (RANK_EPS): weights
  are computed in float32 at least, and the default float64 Gram route resolves singular values
  only down to ~sqrt(eps_64) * S_1, so float64's eps would count noise (WeightWatcher uses the
  float64 eps on float64 singular values);
- entropy = -sum p ln p / ln R, p = lambda / sum lambda over the R largest eigenvalues (0 when
  R = 1). WeightWatcher adds 1e-10 to every p and to R; ours has no such offset.

WeightWatcher 0.7.7 columns (methods.md section 2, "WeightWatcher columns"): rank_loss =
M - numerical_rank (WeightWatcher's matrix_rank is our numerical_rank), weak_rank_loss =
#{lambda_i < tol} (tol 1e-6, WeightWatcher's `tolerance`), sv_max = S_1, sv_min = S_M;
sigma_mp and mp_softrank come from the MP fit passed in.

Warnings (WARNING_CODES): "under-trained" alpha > 6, "over-trained" alpha < 2, "fit-failed",
"non-finite", "rank-deficient" (R < M / 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from spectra.analysis.fingers import FitOptions, TailFit, fit_tail
from spectra.analysis.mp import MPFit
from spectra.analysis.powerlaw import fit_powerlaw
from spectra.analysis.results import LayerMetrics, PowerLawFit
from spectra.errors import ValidationError

ALPHA_LOW = 2.0  # below: over-trained (methods.md section 2)
ALPHA_HIGH = 6.0  # above: under-trained
RANK_EPS = float(np.finfo(np.float32).eps)
WEAK_RANK_TOL = 1e-6  # WeightWatcher's WEAK_RANK_LOSS_TOLERANCE, on eigenvalues


def weak_rank_loss(evals: np.ndarray, tol: float = WEAK_RANK_TOL) -> int:
    """#{lambda_i < tol}: eigenvalues (not singular values) below an absolute tolerance."""
    return int(np.count_nonzero(np.asarray(evals) < tol))


def rank_tolerance(s1: float, big_n: int, *, eps: float = RANK_EPS) -> float:
    """Absolute threshold of the numerical rank: S_1 * N * eps, N = max(m, n)."""
    return float(s1) * big_n * eps


def numerical_rank(S: np.ndarray, big_n: int, *, eps: float = RANK_EPS) -> int:
    """#{S_i > S_1 * N * eps} for singular values S (k,) in any order, N = max(m, n).

    The one numerical rank of spectra: of a weight matrix here, of an update dW in drift.py.
    0 for an empty or all-zero spectrum.
    """
    if S.size == 0:
        return 0
    return int(np.count_nonzero(S > rank_tolerance(np.max(S), big_n, eps=eps)))


def spectral_entropy(evals: np.ndarray, rank: int) -> float | None:
    """-sum p ln p / ln R over the `rank` largest eigenvalues, p normalized over them."""
    if rank < 1:
        return None
    if rank == 1:
        return 0.0
    top = np.sort(evals)[::-1][:rank]
    p = top / top.sum()
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)) / math.log(rank))


def norm_metrics(evals: np.ndarray, alpha: float | None) -> dict[str, float | None]:
    """log_norm, log_spectral_norm, stable_rank, alpha_weighted, log_alpha_norm of an ESD."""
    total = float(np.sum(evals))
    lmax = float(np.max(evals)) if evals.size else 0.0
    if not (total > 0 and lmax > 0):
        return dict.fromkeys(
            ("log_norm", "log_spectral_norm", "stable_rank", "alpha_weighted", "log_alpha_norm")
        )
    out: dict[str, float | None] = {
        "log_norm": math.log10(total),
        "log_spectral_norm": math.log10(lmax),
        "stable_rank": total / lmax,
        "alpha_weighted": None,
        "log_alpha_norm": None,
    }
    if alpha is not None:
        out["alpha_weighted"] = alpha * math.log10(lmax)
        out["log_alpha_norm"] = _log10_sum_pow(evals, alpha)
    return out


def _log10_sum_pow(evals: np.ndarray, alpha: float) -> float:
    """log10(sum lambda^alpha), computed in log space so large alphas do not overflow."""
    pos = evals[evals > 0]
    logs = alpha * np.log(pos)
    top = float(np.max(logs))
    return (top + math.log(float(np.sum(np.exp(logs - top))))) / math.log(10.0)


def layer_warnings(
    fit: PowerLawFit, rank: int | None, big_m: int, *, alpha_bands: bool = True
) -> tuple[str, ...]:
    """Warning codes for a fit and a numerical rank (see module docstring); alpha_bands=False
    (a truncated power law's alpha, not on the power law's scale): no alpha-range codes."""
    codes: list[str] = []
    if fit.status == "failed":
        codes.append("fit-failed")
    elif fit.ok and fit.alpha is not None and alpha_bands:
        if fit.alpha > ALPHA_HIGH:
            codes.append("under-trained")
        elif fit.alpha < ALPHA_LOW:
            codes.append("over-trained")
    if rank is not None and rank < big_m / 2:
        codes.append("rank-deficient")
    return tuple(codes)


@dataclass(frozen=True)
class MatrixMeta:
    """Which matrix a LayerMetrics describes: its key, display name (default: the key), role,
    layer index and stored dtype."""

    key: str
    name: str | None = None
    role: str = "other"
    layer: int | None = None
    dtype: str = ""

    def fields(self) -> dict[str, object]:
        """The identifying LayerMetrics fields."""
        return {
            "key": self.key,
            "name": self.name if self.name is not None else self.key,
            "role": self.role,
            "layer": self.layer,
            "dtype": self.dtype,
        }


def layer_metrics(
    S: np.ndarray,
    shape: tuple[int, int],
    meta: MatrixMeta,
    *,
    spectrum_method: str = "",
    mp: MPFit | None = None,
    fit_options: FitOptions | None = None,
    outlier_ratio: float | None = None,
    rank_eps: float = RANK_EPS,
) -> LayerMetrics:
    """All HT-SR metrics of one matrix from its full singular values S (M,) and shape (m, n).

    S must hold all min(m, n) singular values (any order; float64 recommended): norms and
    entropy need the whole spectrum. Optional metrics computed elsewhere (MP fit, outlier
    ratio) are passed in and stored; fit_options: WeightWatcher's xmax / fix_fingers
    (fingers.py; None: the default fit). Pure: no IO, no torch.

    >>> S = np.linspace(1.0, 3.0, 16)
    >>> lm = layer_metrics(S, (32, 16), MatrixMeta("w"))
    >>> lm.num_evals, round(lm.stable_rank, 4), lm.numerical_rank
    (16, 7.7827, 16)
    """
    S = np.asarray(S, dtype=np.float64).ravel()
    m, n = (int(s) for s in shape)
    big_m, big_n = min(m, n), max(m, n)
    if S.size != big_m:
        raise ValidationError(
            f"layer_metrics needs all min(m, n) = {big_m} singular values of {meta.key!r} "
            f"(shape {m}x{n}), got {S.size}: compute the spectrum with mode='values'"
        )
    common = {
        **meta.fields(),
        "shape": (m, n),
        "num_evals": int(S.size),
        "spectrum_method": spectrum_method,
        "mp_bulk_max": None if mp is None else mp.bulk_max,
        "mp_num_spikes": None if mp is None else mp.num_spikes,
        "sigma_mp": None if mp is None else mp.sigma,
        "mp_softrank": None if mp is None else mp.softrank,
        "outlier_ratio": outlier_ratio,
    }
    if not np.all(np.isfinite(S)):
        return failed_metrics(common, "non-finite singular values")
    evals = np.sort(S**2)[::-1]  # (M,) descending
    if fit_options is None or fit_options.is_default:
        tail = TailFit(fit_powerlaw(evals))
    else:
        tail = fit_tail(evals, fit_options)
    fit = tail.fit
    rank = numerical_rank(S, big_n, eps=rank_eps)
    norms = norm_metrics(evals, fit.alpha)
    return LayerMetrics(
        **common,
        alpha=fit.alpha,
        xmin=fit.xmin,
        xmax=fit.xmax,
        D=fit.D,
        sigma=fit.sigma,
        num_pl_spikes=fit.num_spikes,
        fit_status=fit.status,
        fit_message=fit.message,
        entropy=spectral_entropy(evals, rank),
        numerical_rank=rank,
        warnings=layer_warnings(fit, rank, big_m, alpha_bands=tail.Lambda is None),
        num_fingers=tail.num_fingers,
        raw_alpha=tail.raw_alpha,
        Lambda=tail.Lambda,
        fit_entropy=tail.fit_entropy,
        rank_loss=big_m - rank,
        weak_rank_loss=weak_rank_loss(evals),
        sv_max=float(np.max(S)),
        sv_min=float(np.min(S)),
        **norms,
    )


def failed_layer(
    meta: MatrixMeta,
    shape: tuple[int, int],
    message: str,
    *,
    spectrum_method: str = "",
    code: str = "non-finite",
) -> LayerMetrics:
    """The LayerMetrics of a matrix whose spectrum could not be computed (e.g. NaN entries)."""
    common = {
        **meta.fields(),
        "shape": (int(shape[0]), int(shape[1])),
        "num_evals": 0,
        "spectrum_method": spectrum_method,
    }
    return failed_metrics(common, message, code)


def failed_metrics(common: dict, message: str, code: str = "non-finite") -> LayerMetrics:
    """A LayerMetrics with every number None, fit_status "failed" and warning `code`."""
    nones = dict.fromkeys(
        (
            "alpha",
            "alpha_weighted",
            "xmin",
            "xmax",
            "D",
            "sigma",
            "log_norm",
            "log_spectral_norm",
            "stable_rank",
            "log_alpha_norm",
            "entropy",
            "numerical_rank",
        )
    )
    fields = {**common, **nones, "num_pl_spikes": 0, "fit_status": "failed"}
    return LayerMetrics(**fields, fit_message=message, warnings=(code,))
