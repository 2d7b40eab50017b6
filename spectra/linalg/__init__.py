"""spectra.linalg: singular-value spectra of weight matrices, exact or randomized, batched.

- exact.py: `exact_svdvals`, `exact_svd`: full spectra, float64 Gram route where accurate.
- rsvd.py: `randomized_svd`, `randomized_svd_info` with `RSVDOptions`: seeded block Krylov /
  subspace iteration.
- spectrum.py: `Spectrum`, one matrix's values, optional vectors, method and accuracy facts.
- decompose.py: `SpectrumOptions` (what to compute per matrix), `decompose_batch`.
- engine.py: `compute_spectra` with `EngineOptions`: stream a checkpoint's matrices, batched,
  prefetched, cached.
- cache.py: `SpectrumCache`, safetensors + JSON entries keyed by content and parameters.
"""
