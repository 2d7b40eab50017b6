"""spectra: spectral reports, fine-tune forensics and SVD-initialized adapters from model weights.

Importing spectra configures nothing (no logging set-up, no warning filters).
"""

from __future__ import annotations

from spectra.errors import SpectraError

__version__ = "0.1.0"

__all__ = ["SpectraError", "__version__"]
