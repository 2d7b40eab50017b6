"""Which rank each target gets in `init_adapter`: explicit, allocated, or uniform, then calibration.

Explicit ranks (keyed by weight name or module path) win; otherwise an allocator (the named one,
or the method's ``default_allocator``) splits a budget using the matrices' spectra or HT-SR
alphas (`module_stats`); otherwise every target gets the uniform rank. A method that needs
calibration statistics and was given none then runs the calibration step
(spectra.adapt.calib_step), which may move ranks and set alphas (EVA).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from spectra.adapt.allocate import Allocation, Budget, ModuleStats, allocate, get_allocator
from spectra.adapt.registry import Initializer
from spectra.errors import ValidationError

if TYPE_CHECKING:
    from spectra.adapt.calib_step import CalibrationRequest


def module_stats(
    ckpt: Any, matrices: Sequence[Any], needs: str | None, device: torch.device
) -> list[ModuleStats]:
    """ModuleStats for the allocators: exact spectra (float64) when needed, and HT-SR alphas
    (power-law fit of ``lambda = S^2``, spectra.analysis.powerlaw) for the alpha allocators."""
    from spectra.analysis.powerlaw import fit_powerlaw
    from spectra.linalg.exact import exact_svdvals

    out = []
    values: dict[str, np.ndarray] = {}
    if needs is not None:
        for ref, W in ckpt.read_many(matrices, dtype=torch.float32, device=str(device)):
            values[ref.key] = exact_svdvals(W).cpu().numpy()
    for mat in matrices:
        S = values.get(mat.key)
        alpha = None
        if needs == "alpha" and S is not None:
            fit = fit_powerlaw(S**2)
            alpha = fit.alpha if fit.ok else None
        out.append(ModuleStats(mat.key, tuple(mat.shape), mat.layer, S, alpha))
    return out


def _ranks(
    ckpt: Any,
    selected: list,
    *,
    rank: int,
    allocator: str | None,
    budget: int | None,
    budget_unit: str,
    min_rank: int,
    max_rank: int | None,
    device: torch.device,
) -> tuple[dict[str, int] | None, Allocation | None]:
    if allocator is None:
        if budget is not None:
            raise ValidationError("--budget needs --allocate (uniform, energy, alpha-power, ...)")
        return None, None
    spec = get_allocator(allocator)
    total = budget if budget is not None else rank * len(selected)
    if budget is None and budget_unit != "rank":
        raise ValidationError("a params budget needs an explicit --budget")
    stats = module_stats(ckpt, selected, spec.needs, device)
    alloc = allocate(
        spec.name,
        stats,
        Budget(total, budget_unit),  # type: ignore[arg-type]
        min_rank=min_rank,
        max_rank=max_rank,
    )
    return alloc.ranks, alloc


@dataclass(frozen=True)
class _Choice:
    """Ranks (weight key -> rank, None: uniform), the allocation behind them, calibration
    statistics, alphas from calibration (EVA) and the manifest's calibration record."""

    ranks: dict[str, int] | None
    allocation: Allocation | None
    stats: dict[str, Any] | None
    alphas: dict[str, float] | None = None
    calibration: dict[str, Any] | None = None


def _explicit(
    selected: Sequence[Any], values: Mapping[str, Any] | None, what: str
) -> dict[str, Any] | None:
    """Per-target values keyed by weight name or module path -> keyed by weight name."""
    if values is None:
        return None
    by_path = {m.key.removesuffix(".weight"): m.key for m in selected}
    keys = set(by_path.values())
    out: dict[str, Any] = {}
    for name, value in values.items():
        key = name if name in keys else by_path.get(name)
        if key is None:
            raise ValidationError(
                f"{what} names {name!r}, which is not one of the selected targets "
                f"(e.g. {', '.join(sorted(by_path)[:3])})"
            )
        out[key] = value
    return out


def _choose_ranks(
    ckpt: Any,
    selected: list,
    init: Initializer,
    *,
    source: str | Path,
    rank: int,
    ranks: Mapping[str, int] | None,
    allocation_options: dict[str, Any],
    stats: dict[str, Any] | None,
    alpha: float | None,
    rslora: bool,
    calibration: CalibrationRequest | None,
    device: torch.device,
) -> _Choice:
    """Explicit ranks, or an allocator's (the method's default allocator when none is named),
    or uniform; then, for a method that needs calibration and got no statistics, the calibration
    step (which may move ranks and set alphas: EVA)."""
    allocator = allocation_options["allocator"]
    if ranks is not None:
        if allocator is not None:
            raise ValidationError("give explicit ranks or an allocator (--allocate), not both")
        choice = _Choice(_explicit(selected, ranks, "ranks"), None, stats)
    else:
        if allocator is None:
            allocator = getattr(init, "default_allocator", None)
        chosen, allocation = _ranks(
            ckpt,
            selected,
            rank=rank,
            device=device,
            **{**allocation_options, "allocator": allocator},
        )
        choice = _Choice(chosen, allocation, stats)
    if not init.needs_calibration or stats:
        return choice
    from spectra.adapt.calib_step import CalibrationRequest, run_calibration_step

    outcome = run_calibration_step(
        source,
        init.name,
        selected,
        choice.ranks or {m.key: rank for m in selected},
        calibration or CalibrationRequest(),
        alpha=alpha,
        device=device,
        rslora=rslora,
    )
    return _Choice(outcome.ranks, choice.allocation, outcome.stats, outcome.alphas, outcome.summary)
