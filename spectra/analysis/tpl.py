"""Truncated power-law fit of an ESD tail (WeightWatcher's `fit='TPL'` / `'E_TPL'`), and the
power law bounded at the largest eigenvalue (its `xmax='force'`).

Definitions (docs/methods.md section 2g). On the tail `x_1..x_n >= xmin` (the eigenvalues
`> 1e-5`, as for the power law):

- TPL: `p(x) = x^-alpha e^(-Lambda x) / Z` on `[xmin, inf)`, `Z = Lambda^(alpha - 1)
  Gamma(1 - alpha, Lambda xmin)` (Clauset, Shalizi & Newman 2009, Table 2.1; the powerlaw
  package's `Truncated_Power_Law`, which WeightWatcher 0.7.7 calls). (alpha, Lambda) maximize the
  likelihood over alpha in [ALPHA_MIN, ALPHA_MAX] and Lambda >= 0: the log-likelihood is
  concave (an exponential family in (ln x, x)), so for each alpha the best Lambda solves
  `mean(x) = E[x]` (or is 0 when no Lambda > 0 does) and the profile over alpha has one
  maximum, found by bounded Brent to XATOL. `D` is the KS distance `max_k |F(x_k) - k/n|`,
  `F(x) = 1 - Gamma(1 - alpha, Lambda x) / Gamma(1 - alpha, Lambda xmin)`.
- Bounded power law (`xmax='force'`): `p(x) = (alpha - 1) x^-alpha / (xmin^(1 - alpha) -
  xmax^(1 - alpha))` on `[xmin, xmax]`, xmax the largest eigenvalue; alpha is the root of the
  (monotone) score, D the KS distance with the same bounded CDF.
- xmin: the candidate (every sorted eigenvalue but the largest, or those `allowed`) with the
  smallest D; a candidate whose fit is not finite or sits on an alpha bound does not count.

Everything is scale-equivariant (eigenvalues times c: same alpha and D, Lambda / c).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize

from spectra.analysis.incgamma import (
    log_scaled_upper_gamma,
    log_upper_gamma,
    log_upper_gamma_array,
)

ALPHA_MIN = -10.0  # TPL exponents searched (a finite Lambda makes any real alpha normalizable)
ALPHA_MAX = 30.0
XATOL = 1e-10  # on alpha
_Z_MIN = 1e-30  # Lambda * xmin below this counts as Lambda = 0
_BOUND_SLACK = 1e-6


@dataclass(frozen=True)
class TailModelFit:
    """One fit of a tail model at a given xmin: exponent, cutoff (0 for the bounded power
    law), log-likelihood of the tail, KS distance, tail size; ok False when not usable."""

    alpha: float
    Lambda: float
    loglikelihood: float
    D: float
    n: int
    ok: bool


@dataclass(frozen=True)
class TailSearch:
    """The chosen candidate `index` (into the sorted data) and its fit; `ds` holds the KS
    distance of every candidate searched (1.0 for an unusable one), in candidate order."""

    index: int
    fit: TailModelFit
    ds: np.ndarray


def fit_tpl_at(tail: np.ndarray) -> TailModelFit:
    """The TPL maximum-likelihood fit of an ascending `tail` (n,) whose first entry is xmin."""
    a = float(tail[0])
    n = tail.size
    u = float(np.sum(np.log(tail / a)))  # sum ln(x / xmin)
    r = float(np.mean(tail)) / a  # mean(x) / xmin >= 1
    if n < 2 or not r > 1.0:
        return TailModelFit(math.nan, math.nan, -math.inf, 1.0, n, False)

    last: list[float | None] = [None]  # the previous alpha's z: Newton's start for the next

    def best_z(alpha: float) -> float | None:
        z = _best_z(alpha, r, last[0])
        last[0] = z if z else None
        return z

    def neg_profile(alpha: float) -> float:
        z = best_z(alpha)
        return -_loglik(alpha, z, n, u, r) if z is not None else math.inf

    res = optimize.minimize_scalar(
        neg_profile, bounds=(ALPHA_MIN, ALPHA_MAX), method="bounded", options={"xatol": XATOL}
    )
    alpha = float(res.x)
    z = best_z(alpha)
    inside = ALPHA_MIN + _BOUND_SLACK < alpha < ALPHA_MAX - _BOUND_SLACK
    if z is None or not math.isfinite(res.fun) or not inside:
        return TailModelFit(alpha, math.nan, -math.inf, 1.0, n, False)
    loglik = _loglik(alpha, z, n, u, r) - n * math.log(a)
    return TailModelFit(alpha, z / a, loglik, _tpl_ks(tail, alpha, z), n, True)


def fit_bounded_pl_at(tail: np.ndarray, xmax: float) -> TailModelFit:
    """The power-law MLE on [tail[0], xmax] of an ascending `tail` (n,), all <= xmax."""
    a, n = float(tail[0]), tail.size
    ln_b = math.log(xmax / a)  # ln(xmax / xmin)
    mean_u = float(np.mean(np.log(tail / a)))
    if n < 2 or not ln_b > 0:
        return TailModelFit(math.nan, 0.0, -math.inf, 1.0, n, False)
    # score: mean ln(x/xmin) = E[ln(x/xmin)] = 1/(alpha-1) - ln_b / (b^(alpha-1) - 1), which
    # falls monotonically as alpha grows: one root inside the bounds, or no usable fit

    def score(alpha: float) -> float:
        return _bounded_mean_log(alpha, ln_b) - mean_u

    if not score(ALPHA_MIN) > 0 > score(ALPHA_MAX):
        return TailModelFit(math.nan, 0.0, -math.inf, 1.0, n, False)
    alpha = float(
        optimize.brentq(score, ALPHA_MIN, ALPHA_MAX, xtol=1e-14, rtol=4 * np.finfo(float).eps)
    )
    log_norm = _log_bounded_norm(alpha, ln_b)  # ln of the integral of (x/xmin)^-alpha d(x/xmin)
    loglik = -alpha * mean_u * n - n * log_norm - n * math.log(a)
    u = np.log(tail / a)
    s = alpha - 1.0
    cdf = np.expm1(-s * u) / math.expm1(-s * ln_b) if s != 0.0 else u / ln_b
    D = float(np.max(np.abs(cdf - np.arange(n) / n)))
    return TailModelFit(alpha, 0.0, loglik, D, n, True)


def search_xmin(
    data: np.ndarray, model: str, *, allowed: np.ndarray | None = None
) -> TailSearch | None:
    """Fit `model` ("tpl" or "bounded_pl") at every xmin candidate of the ascending `data`
    (N,) (every entry but the last, or those where `allowed` (N - 1,) is True) and keep the
    smallest KS distance (first on ties). None when no candidate gives a usable fit."""
    cands = np.arange(data.size - 1) if allowed is None else np.flatnonzero(allowed)
    xmax = float(data[-1])
    ds = np.ones(cands.size)
    fits: list[TailModelFit] = []
    for j, i in enumerate(cands.tolist()):
        tail = data[i:]
        fit = fit_tpl_at(tail) if model == "tpl" else fit_bounded_pl_at(tail, xmax)
        fits.append(fit)
        if fit.ok:
            ds[j] = fit.D
    usable = [j for j, f in enumerate(fits) if f.ok]
    if not usable:
        return None
    best = min(usable, key=lambda j: (ds[j], j))
    return TailSearch(int(cands[best]), fits[best], ds)


def tpl_pdf(x: np.ndarray, alpha: float, Lambda: float, xmin: float) -> np.ndarray:
    """The fitted TPL's density at `x` (>= xmin), normalized on [xmin, inf); Lambda = 0 is the
    power law (alpha > 1)."""
    x = np.asarray(x, dtype=np.float64)
    z = Lambda * xmin
    log_g = _log_g(1.0 - alpha, z)
    log_norm = (1.0 - alpha) * math.log(xmin) + log_g - z  # ln of the integral
    return np.exp(-alpha * np.log(x) - Lambda * x - log_norm)


def bounded_pl_pdf(x: np.ndarray, alpha: float, xmin: float, xmax: float) -> np.ndarray:
    """The power law's density at `x`, normalized on [xmin, xmax] (any alpha)."""
    x = np.asarray(x, dtype=np.float64)
    log_norm = math.log(xmin) + _log_bounded_norm(alpha, math.log(xmax / xmin))
    return np.exp(-alpha * np.log(x / xmin) - log_norm)


# ------------------------------------------------------------------ the TPL profile


def _loglik(alpha: float, z: float, n: int, u: float, r: float) -> float:
    """Tail log-likelihood plus n ln xmin, at alpha and z = Lambda xmin (see _log_g)."""
    return -alpha * u - n * z * (r - 1.0) - n * _log_g(1.0 - alpha, z)


def _log_g(s: float, z: float) -> float:
    """ln of Z xmin^(alpha - 1) e^(-z): ln G(s, z), or -ln(alpha - 1) at z = 0."""
    if z == 0.0:
        return -math.log(-s) if s < 0 else math.inf
    return log_scaled_upper_gamma(s, z)


def _log_mean_ratio(alpha: float, z: float) -> float:
    """ln(E[x] / xmin) of the TPL at alpha, z = Lambda xmin: ln G(2 - alpha, z) - ln G(1 - alpha,
    z)."""
    return log_scaled_upper_gamma(2.0 - alpha, z) - log_scaled_upper_gamma(1.0 - alpha, z)


def _best_z(alpha: float, r: float, start: float | None = None) -> float | None:
    """z = Lambda xmin maximizing the likelihood at this alpha: the root of E[x]/xmin = r, or 0
    when even Lambda = 0 gives a mean <= r (possible only for alpha > 2). None: no finite fit.
    `start`: a nearby root (the previous alpha's) for Newton; else, or when Newton does not
    converge, bracketing and Brent's method."""
    if alpha > 2.0 and (alpha - 1.0) / (alpha - 2.0) <= r:
        return 0.0
    log_r = math.log(r)
    if alpha > 1.0 and _log_mean_ratio(alpha, _Z_MIN) <= log_r:
        return 0.0
    if start is not None:
        t = _newton_log_z(alpha, log_r, math.log(start))
        if t is not None:
            return math.exp(t)
    hi = 1.0
    while _log_mean_ratio(alpha, hi) > log_r:  # E[x] falls to xmin as z grows
        hi *= 4.0
        if hi > 1e12:
            return None
    lo = hi / 4.0 if hi > 1.0 else _Z_MIN
    t = optimize.brentq(
        lambda t: _log_mean_ratio(alpha, math.exp(t)) - log_r,
        math.log(lo),
        math.log(hi),
        xtol=1e-13,
        rtol=4 * np.finfo(float).eps,
    )
    return math.exp(t)


_NEWTON_STEPS = 40
_NEWTON_MAX_STEP = 2.0  # in ln z


def _newton_log_z(alpha: float, log_r: float, t: float) -> float | None:
    """Newton's method on t = ln z for ln(E[x]/xmin) = ln r, from `t`: the slope is
    d ln m / d ln z = 1/G(1 - alpha, z) - 1/G(2 - alpha, z) - 1 (< 0: m falls with z), from
    d ln G(s, z)/dz = 1 - s/z - 1/(z G(s, z)). None when it leaves the domain or does not
    converge in _NEWTON_STEPS."""
    for _ in range(_NEWTON_STEPS):
        z = math.exp(t)
        log_g1 = log_scaled_upper_gamma(1.0 - alpha, z)
        log_g2 = log_scaled_upper_gamma(2.0 - alpha, z)
        f = log_g2 - log_g1 - log_r
        slope = math.exp(-log_g1) - math.exp(-log_g2) - 1.0
        if not (math.isfinite(f) and slope < 0):
            return None
        step = max(-_NEWTON_MAX_STEP, min(_NEWTON_MAX_STEP, f / slope))
        t -= step
        if abs(step) <= 1e-13 * max(1.0, abs(t)):
            return t
        if t < math.log(_Z_MIN) or t > math.log(1e12):
            return None
    return None


def _tpl_ks(tail: np.ndarray, alpha: float, z: float) -> float:
    """KS distance max_k |F(x_k) - k/n| of the TPL at alpha, z = Lambda xmin."""
    n = tail.size
    ratio = tail / tail[0]
    s = 1.0 - alpha
    if z == 0.0:
        ccdf = ratio**s
    else:
        ccdf = np.exp(log_upper_gamma_array(s, z * ratio) - log_upper_gamma(s, z))
    return float(np.max(np.abs((1.0 - ccdf) - np.arange(n) / n)))


# ------------------------------------------------------------------ the bounded power law


def _bounded_mean_log(alpha: float, ln_b: float) -> float:
    """E[ln(x / xmin)] of the power law on [xmin, b xmin]."""
    s = alpha - 1.0
    if abs(s * ln_b) < 1e-6:  # the series: L/2 - s L^2/12
        return ln_b / 2.0 - s * ln_b * ln_b / 12.0
    return 1.0 / s - ln_b / math.expm1(s * ln_b)


def _log_bounded_norm(alpha: float, ln_b: float) -> float:
    """ln of the integral of t^-alpha over [1, b]: ln((1 - b^(1 - alpha)) / (alpha - 1))."""
    s = alpha - 1.0
    if s == 0.0:
        return math.log(ln_b)
    return math.log(-math.expm1(-s * ln_b) / s)
