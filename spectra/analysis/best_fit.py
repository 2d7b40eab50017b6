"""`best_fit`: which distribution describes an ESD tail best, by likelihood-ratio tests.

Clauset, Shalizi & Newman 2009 (section 5) and Alstott, Bullmore & Plenz 2014 ("powerlaw: a
Python package for analysis of heavy-tailed distributions", arXiv 1305.0215): on the tail
`x_1..x_n >= xmin` of the fit, each candidate is fitted by maximum likelihood, normalized on
`[xmin, inf)`:

- power_law: `p = (alpha - 1) / xmin (x / xmin)^-alpha`, `alpha = 1 + n / sum ln(x / xmin)`;
- truncated_power_law: `p ~ x^-alpha e^(-Lambda x)` (tpl.py);
- lognormal: `p = phi((ln x - mu) / sigma) / (x sigma) / Q`, `Q = P(X >= xmin)` (mu, sigma by
  Nelder-Mead on (mu, ln sigma) to XATOL from the mean and standard deviation of ln x);
- exponential: `p = Lambda e^(-Lambda (x - xmin))`, `Lambda = 1 / mean(x - xmin)`.

The power law is compared with each alternative as the powerlaw package's
`Fit.distribution_compare('power_law', alt, normalized_ratio=True)` does: with
`l_j = ln p_PL(x_j) - ln p_alt(x_j)`, `R = sum l_j / sqrt(n var(l))` (> 0 favours the power law)
and p = `erfc(|sum l| / sqrt(2 n var(l)))` (Vuong's test), or for the nested truncated power law
`P(chi2_1 > 2 |sum l|)`. `best_fit` is "power_law" unless some alternative beats it
significantly (R < 0 and p < P_SIGNIFICANT); then the one of those with the smallest AIC
`2 k - 2 ln L` (k its number of parameters: the truncated power law contains the exponential,
so it must earn its second parameter; Akaike 1974). (WeightWatcher 0.7.7 has this comparison
commented out of its `fit_powerlaw`, so
it reports no best_fit column; docs/methods.md section 2g.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

from spectra.analysis.incgamma import log_scaled_upper_gamma
from spectra.analysis.tpl import fit_tpl_at

DISTRIBUTIONS = ("power_law", "truncated_power_law", "lognormal", "exponential")
NUM_PARAMETERS = {"power_law": 1, "truncated_power_law": 2, "lognormal": 2, "exponential": 1}
P_SIGNIFICANT = 0.1  # Clauset et al.'s threshold for a likelihood ratio to count
XATOL = 1e-10


@dataclass(frozen=True)
class Comparison:
    """power law vs `alternative`: normalized log-likelihood ratio R (> 0: power law) and its
    p-value."""

    alternative: str
    R: float
    p: float


@dataclass(frozen=True)
class BestFit:
    """The chosen distribution, every comparison, and each candidate's fitted parameters (in
    the powerlaw package's order: alpha; alpha, Lambda; mu, sigma; Lambda) and tail
    log-likelihood."""

    best: str
    comparisons: tuple[Comparison, ...]
    parameters: dict[str, tuple[float, ...]]
    loglikelihoods: dict[str, float]


def best_fit(tail: np.ndarray) -> BestFit | None:
    """Compare the candidates on `tail` (the eigenvalues >= xmin; module docstring). None when
    the tail has fewer than 2 distinct values."""
    x = np.sort(np.asarray(tail, dtype=np.float64).ravel())
    if x.size < 2 or not x[-1] > x[0] or not x[0] > 0:
        return None
    fitted = {name: fn(x) for name, fn in _FITS.items()}
    per_point = {name: None if f is None else f[1] for name, f in fitted.items()}
    params = {name: f[0] for name, f in fitted.items() if f is not None}
    lls = {name: float(np.sum(v)) for name, v in per_point.items() if v is not None}
    comparisons = []
    for alt in DISTRIBUTIONS[1:]:
        if per_point[alt] is None:
            continue
        R, p = loglikelihood_ratio(
            per_point["power_law"], per_point[alt], nested=alt == "truncated_power_law"
        )
        comparisons.append(Comparison(alt, R, p))
    better = [c.alternative for c in comparisons if c.R < 0 and c.p < P_SIGNIFICANT]
    best = min(better, key=lambda k: 2 * NUM_PARAMETERS[k] - 2 * lls[k]) if better else "power_law"
    return BestFit(best, tuple(comparisons), params, lls)


def loglikelihood_ratio(ll1: np.ndarray, ll2: np.ndarray, *, nested: bool) -> tuple[float, float]:
    """(normalized R, p) of per-point log-likelihoods ll1 vs ll2 (module docstring)."""
    diff = np.asarray(ll1) - np.asarray(ll2)
    n = diff.size
    total = float(np.sum(diff))
    variance = float(np.mean((diff - diff.mean()) ** 2))
    if nested:
        p = float(stats.chi2.sf(abs(2.0 * total), 1))
    else:
        p = float(special.erfc(abs(total) / math.sqrt(2.0 * n * variance))) if variance else 0.0
    R = total / math.sqrt(n * variance) if variance > 0 else math.copysign(math.inf, total)
    return R, p


_Fitted = tuple[tuple[float, ...], np.ndarray]  # parameters, per-point log-likelihoods


def _power_law(x: np.ndarray) -> _Fitted:
    u = np.log(x / x[0])
    alpha = 1.0 + x.size / float(np.sum(u))
    return (alpha,), math.log(alpha - 1.0) - math.log(x[0]) - alpha * u


def _truncated_power_law(x: np.ndarray) -> _Fitted | None:
    fit = fit_tpl_at(x)
    if not fit.ok:
        return None
    a, z = float(x[0]), fit.Lambda * float(x[0])
    s = 1.0 - fit.alpha
    log_g = -math.log(-s) if z == 0.0 else log_scaled_upper_gamma(s, z)
    log_norm = s * math.log(a) + log_g - z  # ln of the integral of x^-alpha e^(-Lambda x)
    return (fit.alpha, fit.Lambda), -fit.alpha * np.log(x) - fit.Lambda * x - log_norm


def _lognormal(x: np.ndarray) -> _Fitted | None:
    logs = np.log(x)
    log_xmin = float(logs[0])

    def per_point(params: np.ndarray) -> np.ndarray:
        mu, sigma = float(params[0]), math.exp(float(params[1]))
        z = (logs - mu) / sigma
        log_q = special.log_ndtr((mu - log_xmin) / sigma)  # ln P(X >= xmin)
        return -logs - math.log(sigma) - 0.5 * math.log(2 * math.pi) - 0.5 * z * z - log_q

    start = np.array([float(np.mean(logs)), math.log(float(np.std(logs)))])
    res = optimize.minimize(
        lambda p: -float(np.sum(per_point(p))),
        start,
        method="Nelder-Mead",
        options={"xatol": XATOL, "fatol": 1e-12, "maxiter": 20_000, "maxfev": 40_000},
    )
    ll = per_point(res.x)
    mu, sigma = float(res.x[0]), math.exp(float(res.x[1]))
    return ((mu, sigma), ll) if np.all(np.isfinite(ll)) else None


def _exponential(x: np.ndarray) -> _Fitted:
    lam = 1.0 / float(np.mean(x - x[0]))
    return (lam,), math.log(lam) - lam * (x - x[0])


_FITS = {
    "power_law": _power_law,
    "truncated_power_law": _truncated_power_law,
    "lognormal": _lognormal,
    "exponential": _exponential,
}
