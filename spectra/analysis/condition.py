"""Condition number of a weight matrix as PEFT's KappaTune selector computes it.

PEFT 0.21's ``find_kappa_target_modules`` (``peft.helpers.KappaTuneSelector``; KappaTune) scores
every ``nn.Linear`` by ``kappa = S[0] / (S[-1] + 1e-8)`` from the singular values of its weight
(the ``1e-8`` keeps a singular matrix finite) and picks the modules with the *lowest* kappa.
"""

from __future__ import annotations

import numpy as np

from spectra.errors import ValidationError

KAPPA_EPS = 1e-8  # PEFT's additive guard on the smallest singular value


def condition_number(S: np.ndarray) -> float:
    """``max(S) / (min(S) + 1e-8)`` over all min(m, n) singular values ``S``.

    >>> condition_number(np.array([4.0, 2.0]))
    1.999999990...
    """
    s = np.asarray(S, dtype=np.float64).ravel()
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise ValidationError("the condition number needs a non-empty, finite spectrum")
    return float(s.max() / (s.min() + KAPPA_EPS))
