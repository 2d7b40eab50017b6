"""spectra.analysis: what the spectra say (HT-SR metrics, power-law fits, model summary).

Definitions: ../shared/docs/methods.md section 2. Results are frozen dataclasses in `results`.
"""

from __future__ import annotations

from spectra.analysis.results import (
    WARNING_CODES,
    Analysis,
    GroupSummary,
    LayerMetrics,
    ModelSummary,
    PowerLawFit,
)

__all__ = [
    "WARNING_CODES",
    "Analysis",
    "GroupSummary",
    "LayerMetrics",
    "ModelSummary",
    "PowerLawFit",
]
