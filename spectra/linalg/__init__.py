"""spectra.linalg: singular-value spectra of weight matrices, exact or randomized, batched.

- `exact_svdvals`, `exact_svd` (exact.py): full spectra, float64 Gram route where accurate.
- `randomized_svd`, `randomized_svd_info` (rsvd.py): seeded block Krylov / subspace iteration.
- `Spectrum` (spectrum.py): one matrix's values, optional vectors, method and accuracy facts.
- `compute_spectra` (engine.py): stream a checkpoint's matrices, batched, prefetched, cached.
- `SpectrumCache` (cache.py): safetensors + JSON entries keyed by content and parameters.
"""

from spectra.linalg.cache import CacheCorruptionWarning, SpectrumCache, default_cache_dir
from spectra.linalg.decompose import SpectrumOptions, decompose_batch
from spectra.linalg.engine import MemoryBudgetWarning, compute_spectra, matrix_content_key
from spectra.linalg.exact import exact_svd, exact_svdvals
from spectra.linalg.rsvd import RSVDResult, randomized_svd, randomized_svd_info
from spectra.linalg.spectrum import Spectrum

__all__ = [
    "CacheCorruptionWarning",
    "MemoryBudgetWarning",
    "RSVDResult",
    "Spectrum",
    "SpectrumCache",
    "SpectrumOptions",
    "compute_spectra",
    "decompose_batch",
    "default_cache_dir",
    "exact_svd",
    "exact_svdvals",
    "matrix_content_key",
    "randomized_svd",
    "randomized_svd_info",
]
