"""spectra.linalg: singular-value spectra of weight matrices, exact or randomized, batched.

- `exact_svdvals`, `exact_svd` (exact.py): full spectra, float64 Gram route where accurate.
- `randomized_svd`, `randomized_svd_info` (rsvd.py): seeded block Krylov / subspace iteration.
- `Spectrum` (spectrum.py): one matrix's values, optional vectors, method and accuracy facts.
"""

from spectra.linalg.exact import exact_svd, exact_svdvals
from spectra.linalg.rsvd import RSVDResult, randomized_svd, randomized_svd_info
from spectra.linalg.spectrum import Spectrum

__all__ = [
    "RSVDResult",
    "Spectrum",
    "exact_svd",
    "exact_svdvals",
    "randomized_svd",
    "randomized_svd_info",
]
