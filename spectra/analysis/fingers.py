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
from dataclasses import dataclass, replace

import numpy as np

from spectra.analysis.fit_entropy import line_entropy
from spectra.analysis.powerlaw import EVALS_THRESH, MIN_EVALS, candidate_fits, fit_powerlaw
from spectra.analysis.results import PowerLawFit
from spectra.errors import ValidationError
from spectra.fields import check_fields

FIX_FINGERS = ("xmin_peak", "clip_xmax")
FITS = ("PL", "TPL", "E_TPL")  # power law, truncated power law, TPL with xmin_peak
XMAX_FORCE = "force"
MIN_ALPHA = 2.0  # clip_xmax stops when an alpha falls to this or below
PEAK_BINS = 100
WW_DEFAULT_MAX_FINGERS = 10


@dataclass(frozen=True)
class FitOptions:
    """How the power law of one ESD is fitted (module docstring).

    xmax: drop this many largest eigenvalues first (WeightWatcher's integer xmax), "force": fit
        the power law bounded at the largest eigenvalue (tpl.py), None: neither.
    fix_fingers: None | "xmin_peak" | "clip_xmax".
    fit: "PL" (power law), "TPL" (truncated power law, tpl.py) or "E_TPL" (TPL with xmin
        searched as by "xmin_peak"; WeightWatcher's extended TPL).
    fit_entropy: also the entropy of the KS distances over the xmin candidates searched.
    xmin_max: upper bound of the xmin search for "xmin_peak" (None: 1.5 x the ESD's peak).
    max_fingers / finger_thresh: "clip_xmax" tries up to max_fingers clipped eigenvalues and
        takes the first fit whose alpha drops by more than finger_thresh.
    ww_compat: reproduce WeightWatcher 0.7.7's quirks (module docstring).
    """

    xmax: int | str | None = None
    fix_fingers: str | None = None
    xmin_max: float | None = None
    max_fingers: int = WW_DEFAULT_MAX_FINGERS
    finger_thresh: float = 1.0
    ww_compat: bool = False
    fit: str = "PL"
    fit_entropy: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if self.fix_fingers is not None and self.fix_fingers not in FIX_FINGERS:
            raise ValidationError(
                f"fix_fingers must be one of {list(FIX_FINGERS)} or None, "
                f"got {str(self.fix_fingers)[:40]!r}"
            )
        if self.fit not in FITS:
            raise ValidationError(f"fit must be one of {list(FITS)}, got {str(self.fit)[:40]!r}")
        if isinstance(self.xmax, str) and self.xmax != XMAX_FORCE:
            raise ValidationError(
                f"xmax must be an integer >= 1 or {XMAX_FORCE!r}, got {self.xmax[:40]!r}"
            )
        if isinstance(self.xmax, int) and self.xmax < 1:
            raise ValidationError(
                f"xmax must be >= 1 (the number of top eigenvalues to drop), got {self.xmax!r}"
            )
        self._check_combination()
        if self.max_fingers < 1:
            raise ValidationError(f"max_fingers must be >= 1, got {self.max_fingers!r}")
        if not self.finger_thresh > 0:
            raise ValidationError(f"finger_thresh must be > 0, got {self.finger_thresh!r}")
        if self.xmin_max is not None and not self.xmin_max > 0:
            raise ValidationError(f"xmin_max must be > 0, got {self.xmin_max!r}")

    def _check_combination(self) -> None:
        if self.fix_fingers == "clip_xmax" and self.fit != "PL":
            raise ValidationError(
                f"fix_fingers='clip_xmax' refits a power law only; it does not combine with "
                f"fit={self.fit!r} (use fit='E_TPL', or fix_fingers='xmin_peak')"
            )
        if self.fix_fingers == "clip_xmax" and self.xmax == XMAX_FORCE:
            raise ValidationError(
                "fix_fingers='clip_xmax' clips the top eigenvalues; it does not combine with "
                "xmax='force' (which bounds the fit at the top one): pass one of them"
            )

    @property
    def is_default(self) -> bool:
        return (
            self.xmax is None
            and self.fix_fingers is None
            and self.fit == "PL"
            and not self.fit_entropy
        )

    @property
    def peak_window(self) -> bool:
        """Whether xmin is searched near the ESD's peak ("xmin_peak", "E_TPL")."""
        return self.fix_fingers == "xmin_peak" or self.fit == "E_TPL"


@dataclass(frozen=True)
class TailFit:
    """A power-law fit and what finger fixing did: num_fingers and raw_alpha are set by
    "clip_xmax" only (raw_alpha: the fit before clipping); Lambda by the TPL fits only;
    fit_entropy when asked."""

    fit: PowerLawFit
    num_fingers: int | None = None
    raw_alpha: float | None = None
    Lambda: float | None = None
    fit_entropy: float | None = None


def fit_tail(evals: np.ndarray, options: FitOptions) -> TailFit:
    """The power-law fit of the ESD `evals` (M,) under `options` (module docstring)."""
    lam = np.sort(np.asarray(evals, dtype=np.float64).ravel())
    if isinstance(options.xmax, int):
        if options.xmax > lam.size / 2:
            return TailFit(_failed(f"xmax={options.xmax} drops over half of {lam.size} evals"))
        lam = lam[: -options.xmax]
    if not np.all(np.isfinite(lam)):
        return TailFit(fit_powerlaw(lam))
    data = lam[lam > EVALS_THRESH]
    if options.fit != "PL" or options.xmax == XMAX_FORCE:
        return _model_fit(lam, data, options)
    if options.fix_fingers == "clip_xmax":
        tail, kept = _clip_xmax(lam, data, options)
    elif options.fix_fingers == "xmin_peak":
        tail, kept = TailFit(_xmin_peak(lam, data, options)), data
    else:
        tail, kept = TailFit(_count_all(fit_powerlaw(lam), lam)), data
    if options.fit_entropy and tail.fit.ok:
        allowed = _peak_window(kept, options)[0] if options.peak_window else None
        ds = candidate_fits(kept)[1]
        tail = replace(tail, fit_entropy=line_entropy(ds if allowed is None else ds[allowed]))
    return tail


def _model_fit(lam: np.ndarray, data: np.ndarray, options: FitOptions) -> TailFit:
    """The TPL ("TPL", "E_TPL") or the bounded power law (xmax="force"): tpl.py."""
    if data.size < MIN_EVALS:
        return TailFit(fit_powerlaw(data))  # "skipped", with its message
    allowed = None
    if options.peak_window:
        allowed, message = _peak_window(data, options)
        if allowed is None:
            return TailFit(_failed(message))
    model = "tpl" if options.fit != "PL" else "bounded_pl"
    # imported here: tpl.py needs scipy (0.4-0.7 s of CPU), which a default report never loads
    from spectra.analysis.tpl import search_xmin

    found = search_xmin(data, model, allowed=allowed)
    if found is None:
        return TailFit(_failed(f"no xmin candidate gave a finite {model} fit"))
    i, best = found.index, found.fit
    n_all = int(np.count_nonzero(lam >= data[i]))
    # the powerlaw package gives the TPL no standard error; the power law's is (alpha-1)/sqrt(n)
    sigma = None if model == "tpl" else (best.alpha - 1.0) / math.sqrt(best.n)
    fit = PowerLawFit(best.alpha, float(data[i]), float(data[-1]), best.D, sigma, n_all, "ok")
    return TailFit(
        fit,
        Lambda=best.Lambda if model == "tpl" else None,
        fit_entropy=line_entropy(found.ds) if options.fit_entropy else None,
    )


def _count_all(fit: PowerLawFit, lam: np.ndarray) -> PowerLawFit:
    """num_spikes = every (xmax-clipped) eigenvalue >= xmin, as WeightWatcher counts."""
    if not fit.ok or fit.xmin is None:
        return fit
    n = int(np.count_nonzero(lam >= fit.xmin))
    return PowerLawFit(fit.alpha, fit.xmin, fit.xmax, fit.D, fit.sigma, n, fit.status)


def _clip_xmax(
    lam: np.ndarray, data: np.ndarray, options: FitOptions
) -> tuple[TailFit, np.ndarray]:
    """The clip_xmax fit and the eigenvalues its final fit searched."""
    raw = fit_powerlaw(data)
    if not raw.ok or raw.alpha is None:
        return TailFit(raw), data
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
            clipped = TailFit(_count_all(fit, lam), num_fingers=k - shift, raw_alpha=raw.alpha)
            return clipped, data[:-k]
        if fit.alpha <= MIN_ALPHA:
            break
    return TailFit(_count_all(raw, lam), num_fingers=0, raw_alpha=raw.alpha), data


def esd_peak(data: np.ndarray) -> float:
    """10^e, e the left edge of the fullest of PEAK_BINS equal bins of log10(data)."""
    counts, edges = np.histogram(np.log10(data), bins=PEAK_BINS)
    return float(10.0 ** edges[int(np.argmax(counts))])


def _peak_window(data: np.ndarray, options: FitOptions) -> tuple[np.ndarray | None, str]:
    """Which xmin candidates (data[:-1]) "xmin_peak" searches: `[0.95 p, xmin_max)` (module
    docstring), or (None, why) when xmin_max is below the window."""
    peak = esd_peak(data)
    hi = 1.5 * peak if options.xmin_max is None else options.xmin_max
    lo = math.log10(0.95 * peak) if options.ww_compat else 0.95 * peak
    if hi < 0.95 * peak:
        return None, f"xmin_max={hi:.6g} is below 0.95 x the ESD peak {peak:.6g}"
    cand = data[:-1]
    allowed = (cand >= min(lo, hi)) & (cand < max(lo, hi))
    if options.ww_compat and np.any(allowed):  # the powerlaw package drops the last in range
        allowed[np.flatnonzero(allowed)[-1]] = False
    return allowed, f"no xmin candidate in [{lo:.6g}, {hi:.6g})"


def _xmin_peak(lam: np.ndarray, data: np.ndarray, options: FitOptions) -> PowerLawFit:
    if data.size < MIN_EVALS:
        return fit_powerlaw(data)  # "skipped", with its message
    allowed, message = _peak_window(data, options)
    if allowed is None:
        return _failed(message)
    alphas, ds = candidate_fits(data)
    scores = np.where(allowed, ds, np.inf)
    if not np.any(np.isfinite(scores) & (scores < 1.0)):
        return _failed(f"{message} gave a finite power law")
    i = int(np.argmin(scores))
    n = data.size - i
    alpha = float(alphas[i])
    n_all = int(np.count_nonzero(lam >= data[i]))
    sigma = (alpha - 1.0) / math.sqrt(n)
    return PowerLawFit(alpha, float(data[i]), float(data[-1]), float(ds[i]), sigma, n_all, "ok")


def _failed(message: str) -> PowerLawFit:
    return PowerLawFit(None, None, None, None, None, 0, "failed", message)
