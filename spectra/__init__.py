"""spectra: spectral reports, fine-tune forensics and SVD-initialized adapters from model weights.

The three entry points mirror the CLI:

>>> import spectra
>>> analysis = spectra.analyze()                      # doctest: +SKIP  (bundled MiniLM)
>>> q_only = spectra.analyze("org/name", spectra.AnalyzeOptions(roles=("q",)))  # doctest: +SKIP
>>> cmp = spectra.compare("base", "ft-or-adapter")    # doctest: +SKIP
>>> opts = spectra.InitOptions(out="o", method="pissa", rank=16, targets=["q", "v"])
>>> res = spectra.init_adapter("base", opts)          # doctest: +SKIP

Importing spectra configures nothing (no logging set-up, no warning filters) and loads the heavy
modules only when one of these names is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from spectra.errors import SpectraError

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily on first attribute access)
_LAZY = {
    "Checkpoint": "spectra.sources.checkpoint",
    "analyze": "spectra.jobs.report",
    "AnalyzeOptions": "spectra.jobs.report",
    "Analysis": "spectra.analysis.results",
    "compare": "spectra.jobs.compare",
    "Comparison": "spectra.analysis.comparison",
    "CompareOptions": "spectra.analysis.comparison",
    "init_adapter": "spectra.jobs.init",
    "InitOptions": "spectra.jobs.init",
    "make_plan": "spectra.jobs.plan",
    "PlanOptions": "spectra.jobs.plan",
    "mitigate": "spectra.jobs.mitigate",
    "MitigateOptions": "spectra.jobs.mitigate",
    "Mitigation": "spectra.jobs.mitigate",
    "smooth": "spectra.jobs.smooth",
    "SmoothOptions": "spectra.jobs.smooth",
    "Smoothing": "spectra.jobs.smooth",
    "compute_spectra": "spectra.linalg.engine",
    "Spectrum": "spectra.linalg.spectrum",
}

__all__ = ["SpectraError", "__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'spectra' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
