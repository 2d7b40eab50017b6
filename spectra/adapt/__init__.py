"""spectra.adapt: from weights (and analysis) to LoRA adapters.

- ``factorize`` (factorize.py): the one SVD-slice -> LoRA factors step every initializer uses.
- ``INITIALIZERS`` / ``register_initializer`` / ``get_initializer`` (registry.py): PiSSA, MiLoRA,
  OLoRA here; CorDA, EVA, LaMDA++ by their own modules. A new method is one file, one entry.
- ``ALLOCATORS`` / ``allocate`` (allocate.py): rank allocators, budget in, ``{module: rank}`` out.
- ``select_targets`` / ``build_plan`` (plan.py): targets -> modules -> per-module rank and alpha.
- ``init_adapter`` (init.py): the whole run, writing a PEFT adapter, residual base and manifest.
- ``CalibrationRequest`` (calib_step.py): where CorDA/EVA calibration data comes from and how
  its statistics, EVA's ranks and alphas reach ``init_adapter`` (forward passes: calib_collect.py).
"""

from __future__ import annotations

from spectra.adapt.allocate import (
    ALLOCATORS,
    Allocation,
    Budget,
    ModuleStats,
    allocate,
    get_allocator,
    register_allocator,
)
from spectra.adapt.factorize import factorize, reconstruction_error, residual
from spectra.adapt.init import InitResult, init_adapter
from spectra.adapt.plan import AdapterPlan, ModulePlan, build_plan, select_targets
from spectra.adapt.registry import (
    INITIALIZERS,
    Factors,
    InitContext,
    Initializer,
    available_initializers,
    get_initializer,
    register_initializer,
)

__all__ = [
    "ALLOCATORS",
    "INITIALIZERS",
    "AdapterPlan",
    "Allocation",
    "Budget",
    "Factors",
    "InitContext",
    "InitResult",
    "Initializer",
    "ModulePlan",
    "ModuleStats",
    "allocate",
    "available_initializers",
    "build_plan",
    "factorize",
    "get_allocator",
    "get_initializer",
    "init_adapter",
    "reconstruction_error",
    "register_allocator",
    "register_initializer",
    "residual",
    "select_targets",
]
