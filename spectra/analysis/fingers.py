"""WeightWatcher 0.7.7's power-law fit options: `xmax` (clip the top eigenvalues) and
`fix_fingers` ('xmin_peak' | 'clip_xmax'), over the CSN fit of powerlaw.py.

Definitions (docs/methods.md section 2b; WeightWatcher's `fit_powerlaw` and
`fit_clipped_powerlaw`; Martin & Mahoney, arXiv 2002.06716 on "fingers", the few large
eigenvalues a finite matrix throws past the tail that pull alpha up):

- `xmax = k` (k >= 1): the k largest eigenvalues are dropped before anything else; more than
  half the spectrum: the fit fails.
- The fit sample is every eigenvalue `> 1e-5` (powerlaw.EVALS_THRESH); `num_pl_spikes` counts
  the (xmax-clipped) eigenvalues `>= xmin`, so fingers removed by 'clip_xmax' still count.
- 'clip_xmax': fit once (raw_alpha); then drop the top k = 1, 2, ..., max_fingers eigenvalues
  in turn and refit; the first k whose alpha is below `raw_alpha - finger_thresh` is taken
  (num_fingers = k); stop without one when an alpha falls to 2 or below (MIN_ALPHA) or k
  passes max_fingers (then the raw fit stands, num_fingers = 0).
- 'xmin_peak': `xmin` is searched only in `[0.95 p, xmin_max)`, p = `10^e`, e the left edge of
  the fullest of 100 equal bins of log10(eigenvalues); xmin_max defaults to 1.5 p.

Compatibility (`ww_compat=True`, the `--ww-quirks` flag; off by default): WeightWatcher 0.7.7's
own behaviour, reproduced only to compare numbers with it:
- 'xmin_peak' uses `log10(0.95 p)` as the lower bound (a log10 number against linear
  eigenvalues, so in effect no lower bound) and, as the powerlaw package does for a range,
  never tries the largest candidate inside the range;
- 'clip_xmax' starts at k = 2, reports num_fingers = k - 1, and resets max_fingers to 10
  unless it is at least half the number of eigenvalues.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from spectra.analysis.powerlaw import EVALS_THRESH, MIN_EVALS, candidate_fits, fit_powerlaw
from spectra.analysis.results import PowerLawFit
from spectra.errors import ValidationError
from spectra.fields import check_fields

FIX_FINGERS = ("xmin_peak", "clip_xmax")
MIN_ALPHA = 2.0  # clip_xmax stops when an alpha falls to this or below
PEAK_BINS = 100
WW_DEFAULT_MAX_FINGERS = 10


@dataclass(frozen=True)
class FitOptions:
    """How the power law of one ESD is fitted (module docstring).

    xmax: drop this many largest eigenvalues first (WeightWatcher's integer xmax), None: none.
    fix_fingers: None | "xmin_peak" | "clip_xmax".
    xmin_max: upper bound of the xmin search for "xmin_peak" (None: 1.5 x the ESD's peak).
    max_fingers / finger_thresh: "clip_xmax" tries up to max_fingers clipped eigenvalues and
        takes the first fit whose alpha drops by more than finger_thresh.
    ww_compat: reproduce WeightWatcher 0.7.7's quirks (module docstring).
    """

    xmax: int | None = None
    fix_fingers: str | None = None
    xmin_max: float | None = None
    max_fingers: int = WW_DEFAULT_MAX_FINGERS
    finger_thresh: float = 1.0
    ww_compat: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if self.fix_fingers is not None and self.fix_fingers not in FIX_FINGERS:
            raise ValidationError(
                f"fix_fingers must be one of {list(FIX_FINGERS)} or None, "
                f"got {str(self.fix_fingers)[:40]!r}"
            )
        if self.xmax is not None and self.xmax < 1:
            raise ValidationError(
                f"xmax must be >= 1 (the number of top eigenvalues to drop), got {self.xmax!r}"
            )
        if self.max_fingers < 1:
            raise ValidationError(f"max_fingers must be >= 1, got {self.max_fingers!r}")
        if not self.finger_thresh > 0:
            raise ValidationError(f"finger_thresh must be > 0, got {self.finger_thresh!r}")
        if self.xmin_max is not None and not self.xmin_max > 0:
            raise ValidationError(f"xmin_max must be > 0, got {self.xmin_max!r}")

    @property
    def is_default(self) -> bool:
        return self.xmax is None and self.fix_fingers is None


@dataclass(frozen=True)
class TailFit:
    """A power-law fit and what finger fixing did: num_fingers and raw_alpha are set by
    "clip_xmax" only (raw_alpha: the fit before clipping)."""

    fit: PowerLawFit
    num_fingers: int | None = None
    raw_alpha: float | None = None


def fit_tail(evals: np.ndarray, options: FitOptions) -> TailFit:
    """The power-law fit of the ESD `evals` (M,) under `options` (module docstring)."""
    lam = np.sort(np.asarray(evals, dtype=np.float64).ravel())
    if options.xmax is not None:
        if options.xmax > lam.size / 2:
            return TailFit(_failed(f"xmax={options.xmax} drops over half of {lam.size} evals"))
        lam = lam[: -options.xmax]
    if not np.all(np.isfinite(lam)):
        return TailFit(fit_powerlaw(lam))
    data = lam[lam > EVALS_THRESH]
    if options.fix_fingers == "clip_xmax":
        return _clip_xmax(lam, data, options)
    if options.fix_fingers == "xmin_peak":
        return TailFit(_xmin_peak(lam, data, options))
    return TailFit(_count_all(fit_powerlaw(lam), lam))


def _count_all(fit: PowerLawFit, lam: np.ndarray) -> PowerLawFit:
    """num_spikes = every (xmax-clipped) eigenvalue >= xmin, as WeightWatcher counts."""
    if not fit.ok or fit.xmin is None:
        return fit
    n = int(np.count_nonzero(lam >= fit.xmin))
    return PowerLawFit(fit.alpha, fit.xmin, fit.xmax, fit.D, fit.sigma, n, fit.status)


def _clip_xmax(lam: np.ndarray, data: np.ndarray, options: FitOptions) -> TailFit:
    raw = fit_powerlaw(data)
    if not raw.ok or raw.alpha is None:
        return TailFit(raw)
    first, limit, shift = 1, options.max_fingers, 0
    if options.ww_compat:  # WeightWatcher 0.7.7: range(2, max_fingers), num_fingers = k - 1
        limit = options.max_fingers
        if limit < data.size / 2:
            limit = WW_DEFAULT_MAX_FINGERS
        first, limit, shift = 2, limit - 1, 1
    for k in range(first, limit + 1):
        if data.size - k < MIN_EVALS:
            break
        fit = fit_powerlaw(data[:-k])
        if not fit.ok or fit.alpha is None:
            break
        if fit.alpha + options.finger_thresh < raw.alpha:
            return TailFit(_count_all(fit, lam), num_fingers=k - shift, raw_alpha=raw.alpha)
        if fit.alpha <= MIN_ALPHA:
            break
    return TailFit(_count_all(raw, lam), num_fingers=0, raw_alpha=raw.alpha)


def esd_peak(data: np.ndarray) -> float:
    """10^e, e the left edge of the fullest of PEAK_BINS equal bins of log10(data)."""
    counts, edges = np.histogram(np.log10(data), bins=PEAK_BINS)
    return float(10.0 ** edges[int(np.argmax(counts))])


def _xmin_peak(lam: np.ndarray, data: np.ndarray, options: FitOptions) -> PowerLawFit:
    if data.size < MIN_EVALS:
        return fit_powerlaw(data)  # "skipped", with its message
    peak = esd_peak(data)
    hi = 1.5 * peak if options.xmin_max is None else options.xmin_max
    lo = math.log10(0.95 * peak) if options.ww_compat else 0.95 * peak
    if hi < 0.95 * peak:
        return _failed(f"xmin_max={hi:.6g} is below 0.95 x the ESD peak {peak:.6g}")
    alphas, ds = candidate_fits(data)
    cand = data[:-1]
    allowed = (cand >= min(lo, hi)) & (cand < max(lo, hi))
    if options.ww_compat and np.any(allowed):  # the powerlaw package drops the last in range
        allowed[np.flatnonzero(allowed)[-1]] = False
    scores = np.where(allowed, ds, np.inf)
    if not np.any(np.isfinite(scores) & (scores < 1.0)):
        return _failed(f"no xmin candidate in [{lo:.6g}, {hi:.6g}) gave a finite power law")
    i = int(np.argmin(scores))
    n = data.size - i
    alpha = float(alphas[i])
    n_all = int(np.count_nonzero(lam >= data[i]))
    sigma = (alpha - 1.0) / math.sqrt(n)
    return PowerLawFit(alpha, float(data[i]), float(data[-1]), float(ds[i]), sigma, n_all, "ok")


def _failed(message: str) -> PowerLawFit:
    return PowerLawFit(None, None, None, None, None, 0, "failed", message)
