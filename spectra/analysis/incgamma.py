"""The upper incomplete gamma function Gamma(s, z) for any real s and z > 0, in scaled form.

scipy's `gammaincc` covers s > 0 only, and the truncated power law's normalizer needs
`Gamma(1 - alpha, z)` with alpha > 1 (s < 0). Here

    G(s, z) = Gamma(s, z) * exp(z) * z^(-s),   so   ln Gamma(s, z) = ln G + s ln z - z,

which stays finite where Gamma itself under- or overflows (z -> 0 with s << 0, z large):

- z >= max(1, s + 1): the Legendre continued fraction
  `G = 1 / (z + 1 - s - 1 (1 - s) / (z + 3 - s - 2 (2 - s) / (z + 5 - s - ...)))`, evaluated by
  the modified Lentz method (Numerical Recipes, 3rd ed., section 6.2), valid for every real s;
- otherwise, s > 0: `Gamma(s, z) = gammaincc(s, z) * Gamma(s)` (scipy);
- otherwise (s <= 0, z < 1): from s0 = s + k in (0, 1] down by the recurrence
  `Gamma(a, z) = (Gamma(a + 1, z) - z^a e^-z) / a`, in scaled form `G(a) = (z G(a + 1) - 1) / a`
  (its terms have one sign for z < 1, so nothing cancels); `G(0, z) = e^z E1(z)` where a = 0.

Checked against mpmath.gammainc in tests/test_tpl.py.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

_EPS = 1e-16
_TINY = 1e-300
_MAX_TERMS = 10_000


def log_upper_gamma(s: float, z: float) -> float:
    """ln Gamma(s, z) for real s and z > 0 (module docstring)."""
    return log_scaled_upper_gamma(s, z) + s * math.log(z) - z


def log_scaled_upper_gamma(s: float, z: float) -> float:
    """ln G(s, z) = ln Gamma(s, z) + z - s ln z for real s and z > 0 (module docstring)."""
    if not z > 0:
        raise ValueError(f"z must be > 0, got {z!r}")
    if z >= max(1.0, s + 1.0):
        return math.log(_continued_fraction(s, z))
    if s > 0:
        return _scipy_log_scaled(s, z)
    k = math.floor(-s) + 1
    a = s + k  # in (0, 1]
    g = math.exp(_scipy_log_scaled(a, z))  # <= Gamma(a) z^-a: finite for z >= 1e-300
    for _ in range(k):
        a -= 1.0
        g = math.exp(z) * special.exp1(z) if a == 0.0 else (z * g - 1.0) / a
    return math.log(g)


def _scipy_log_scaled(s: float, z: float) -> float:
    """ln G(s, z) for s > 0 from scipy's regularized gammaincc (no underflow for z < s + 1)."""
    return math.log(special.gammaincc(s, z)) + special.gammaln(s) + z - s * math.log(z)


def _continued_fraction(s: float, z: float) -> float:
    b = z + 1.0 - s
    c = 1.0 / _TINY
    d = 1.0 / b if b != 0.0 else 1.0 / _TINY
    h = d
    for i in range(1, _MAX_TERMS):
        an = -i * (i - s)
        b += 2.0
        d = an * d + b
        d = d if abs(d) > _TINY else _TINY
        c = b + an / c
        c = c if abs(c) > _TINY else _TINY
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            return h
    return h  # not converged to eps within _MAX_TERMS terms (not reached for z >= 1)


def log_upper_gamma_array(s: float, z: np.ndarray) -> np.ndarray:
    """`log_upper_gamma(s, z_j)` for every entry of `z` (> 0), vectorized over z by the same
    three routes (module docstring)."""
    z = np.asarray(z, dtype=np.float64)
    if not np.all(z > 0):
        raise ValueError("z must be > 0")
    log_g = np.empty_like(z)
    cf = z >= max(1.0, s + 1.0)
    if np.any(cf):
        log_g[cf] = np.log(_continued_fraction_array(s, z[cf]))
    rest = ~cf
    if np.any(rest):
        zr = z[rest]
        if s > 0:
            log_g[rest] = _scipy_log_scaled_array(s, zr)
        else:
            k = math.floor(-s) + 1
            a = s + k
            g = np.exp(_scipy_log_scaled_array(a, zr))
            for _ in range(k):
                a -= 1.0
                g = np.exp(zr) * special.exp1(zr) if a == 0.0 else (zr * g - 1.0) / a
            log_g[rest] = np.log(g)
    return log_g + s * np.log(z) - z


def _scipy_log_scaled_array(s: float, z: np.ndarray) -> np.ndarray:
    return np.log(special.gammaincc(s, z)) + special.gammaln(s) + z - s * np.log(z)


def _continued_fraction_array(s: float, z: np.ndarray) -> np.ndarray:
    b = z + 1.0 - s
    c = np.full_like(z, 1.0 / _TINY)
    d = 1.0 / np.where(b != 0.0, b, _TINY)
    h = d.copy()
    active = np.ones(z.shape, dtype=bool)
    for i in range(1, _MAX_TERMS):
        an = -i * (i - s)
        b = b + 2.0
        d = an * d + b
        d = np.where(np.abs(d) > _TINY, d, _TINY)
        c = b + an / c
        c = np.where(np.abs(c) > _TINY, c, _TINY)
        d = 1.0 / d
        delta = d * c
        h = np.where(active, h * delta, h)
        active &= np.abs(delta - 1.0) >= _EPS
        if not np.any(active):
            break
    return h
