"""spectra.adapt: from weights (and calibration statistics) to LoRA factors; no files written.

- factorize.py: the one SVD-slice -> LoRA factors step (``factorize``), ``residual``,
  ``reconstruction_error``, ``as_stored`` (storage rounding).
- registry.py: ``Initializer``, ``register_initializer`` / ``get_initializer``. Methods, one file
  each: pissa.py, milora.py, olora.py, corda.py, eva.py, lamda.py (svd.py: the top-r / exact
  SVD routes they use).
- allocate.py: rank allocators, budget in, ``{module: rank}`` out; ranks.py: their inputs read
  from a checkpoint (``module_stats``) and ``allocated_ranks``.
- plan.py: ``select_targets`` / ``build_plan``: targets -> modules -> per-module rank and alpha;
  ``factor_matrix``: one planned matrix through its method, checked.
- Calibration (CorDA, EVA): calib_data.py (texts), calib_model.py (transformers model),
  calib_collect.py (forward passes with hooks), stats.py (streaming statistics and their file),
  calibrate.py (what one method needs: statistics, EVA's ranks).

The init job that runs these and writes adapter, residual base and manifest is spectra.jobs.init.
"""
