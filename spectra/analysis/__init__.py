"""spectra.analysis: what the spectra say (HT-SR metrics, power-law fits, model summary).

Definitions: ../shared/docs/methods.md section 2. Results are frozen dataclasses in `results`;
`analyze()` runs the whole pipeline on a checkpoint.
"""

from __future__ import annotations

from spectra.analysis.analyze import AnalyzeOptions, analyze
from spectra.analysis.htsr import layer_metrics
from spectra.analysis.mp import MPFit, mp_fit
from spectra.analysis.outliers import outlier_ratio
from spectra.analysis.powerlaw import fit_powerlaw
from spectra.analysis.randomized import esd_distance, shuffle_entries
from spectra.analysis.results import (
    WARNING_CODES,
    Analysis,
    GroupSummary,
    LayerMetrics,
    ModelSummary,
    PowerLawFit,
)
from spectra.analysis.summary import summarize

__all__ = [
    "WARNING_CODES",
    "Analysis",
    "AnalyzeOptions",
    "GroupSummary",
    "LayerMetrics",
    "MPFit",
    "ModelSummary",
    "PowerLawFit",
    "analyze",
    "esd_distance",
    "fit_powerlaw",
    "layer_metrics",
    "mp_fit",
    "outlier_ratio",
    "shuffle_entries",
    "summarize",
]
