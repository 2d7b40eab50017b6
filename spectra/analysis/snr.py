"""Signal-to-noise ratio of a weight matrix as cognitivecomputations/spectrum defines it.

Spectrum (Hartford et al. 2024, "Spectrum: Targeted Training on Signal to Noise Ratio",
arXiv 2406.06623; its `spectrum.py`) scores a matrix ``W`` (n x m) from its singular values
``S`` (descending):

- ``sigma = IQR(S) / 1.349``: the interquartile range of the singular values (quantiles by linear
  interpolation, as ``torch.quantile``) scaled as for a Gaussian;
- ``threshold = sigma * (1 + sqrt(beta))`` with ``beta = min(n, m) / max(n, m)``: its
  Marchenko-Pastur edge (written there as ``sigma * sqrt((1 + sqrt(beta))^2)``), compared with
  singular values, not eigenvalues;
- ``signal = sum(S[S > threshold])`` (0 when none), ``noise = sum(S[S <= threshold])`` (1 when
  none: the tool's literal default);
- ``snr = (signal / noise) / S[0]`` (the tool divides by the largest singular value and calls
  the result ``snr``); ``inf`` when ``noise == 0``, as the tool writes it.

Pure function of the spectrum; docs/methods.md section "Plans" records the choices the tool
leaves open.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from spectra.analysis.results import json_safe
from spectra.errors import ValidationError

IQR_TO_SIGMA = 1.349  # IQR of a standard normal distribution


@dataclass(frozen=True)
class SpectrumSNR:
    """The tool's score ``snr`` and its parts (sigma, MP threshold, signal and noise sums,
    largest singular value, number of values above the threshold)."""

    snr: float
    sigma: float
    threshold: float
    signal: float
    noise: float
    s_max: float
    num_signal: int

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def mp_threshold(sigma: float, shape: tuple[int, int]) -> float:
    """The tool's MP edge for singular values: ``sigma * (1 + sqrt(min/max))``."""
    n, m = (int(s) for s in shape)
    if n < 1 or m < 1:
        raise ValidationError(f"shape must be two positive sizes, got {shape}")
    beta = min(n, m) / max(n, m)
    return float(sigma * np.sqrt((1.0 + np.sqrt(beta)) ** 2))


def spectrum_snr(S: np.ndarray, shape: tuple[int, int]) -> SpectrumSNR:
    """Spectrum's SNR of a matrix of ``shape`` with singular values ``S`` (any order).

    >>> round(spectrum_snr(np.array([10.0, 1.0, 1.0, 1.0]), (4, 4)).snr, 4)
    0.3333
    """
    s = np.sort(np.asarray(S, dtype=np.float64).ravel())[::-1]
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise ValidationError("the SNR needs a non-empty, finite spectrum")
    q75, q25 = np.quantile(s, [0.75, 0.25])
    sigma = float((q75 - q25) / IQR_TO_SIGMA)
    cut = mp_threshold(sigma, shape)
    above = s > cut
    signal = float(s[above].sum()) if above.any() else 0.0
    noise = float(s[~above].sum()) if (~above).any() else 1.0
    ratio = signal / noise if noise != 0 else float("inf")
    s_max = float(s[0])
    snr = ratio / s_max if s_max != 0 else float("inf") if ratio else float("nan")
    return SpectrumSNR(snr, sigma, cut, signal, noise, s_max, int(above.sum()))
