"""Allocated ranks for init: the allocators' inputs read from a checkpoint, and their answer.

An allocator (spectra.adapt.allocate) splits a budget over the selected matrices using their
spectra or HT-SR alphas; `module_stats` computes those (exact singular values in float64, a
power-law fit of ``lambda = S^2``), `allocated_ranks` runs the allocator. Which ranks win
(explicit, allocated or uniform, then calibration) is the init job's decision
(spectra.jobs.init).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from spectra.adapt.allocate import Allocation, Budget, ModuleStats, allocate, get_allocator
from spectra.analysis.powerlaw import fit_powerlaw
from spectra.errors import ValidationError
from spectra.linalg.exact import exact_svdvals
from spectra.sources.checkpoint import Checkpoint
from spectra.sources.roles import MatrixRef


@dataclass(frozen=True)
class AllocationOptions:
    """How an allocator splits ranks (CLI: ``--allocate``, ``--budget``, ...).

    allocator: a registered allocator name, None for no allocation (uniform ``rank``);
    rank: the mean rank, giving the budget ``rank * targets`` when ``budget`` is None;
    budget / budget_unit: total rank (``"rank"``) or parameters (``"params"``, needs a budget);
    min_rank / max_rank: per-module bounds.
    """

    allocator: str | None = None
    rank: int = 16
    budget: int | None = None
    budget_unit: str = "rank"
    min_rank: int = 1
    max_rank: int | None = None


def module_stats(
    ckpt: Checkpoint, matrices: Sequence[MatrixRef], needs: str | None, device: torch.device
) -> list[ModuleStats]:
    """ModuleStats for the allocators: exact spectra (float64) when needed, and HT-SR alphas
    (power-law fit of ``lambda = S^2``, spectra.analysis.powerlaw) for the alpha allocators."""
    values: dict[str, np.ndarray] = {}
    if needs is not None:
        for ref, W in ckpt.read_many(matrices, dtype=torch.float32, device=str(device)):
            values[ref.key] = exact_svdvals(W).cpu().numpy()
    return stats_from_values(matrices, values, needs)


def stats_from_values(
    matrices: Sequence[MatrixRef], values: Mapping[str, np.ndarray], needs: str | None
) -> list[ModuleStats]:
    """ModuleStats from singular values already computed (weight key -> S, descending): the
    one rule for what an allocator sees, whether the values were just computed (init) or come
    from the spectrum engine and its cache (`spectra plan`)."""
    out = []
    for mat in matrices:
        S = values.get(mat.key)
        alpha = None
        if needs == "alpha" and S is not None:
            fit = fit_powerlaw(S**2)
            alpha = fit.alpha if fit.ok else None
        out.append(ModuleStats(mat.key, tuple(mat.shape), mat.layer, S, alpha))
    return out


def allocated_ranks(
    ckpt: Checkpoint,
    selected: Sequence[MatrixRef],
    options: AllocationOptions,
    device: torch.device,
) -> tuple[dict[str, int] | None, Allocation | None]:
    """``(weight key -> rank, the Allocation)`` from ``options.allocator``, or ``(None, None)``
    without an allocator (every target then gets the uniform rank)."""
    if options.allocator is None:
        if options.budget is not None:
            raise ValidationError("--budget needs --allocate (uniform, energy, alpha-power, ...)")
        return None, None
    spec = get_allocator(options.allocator)
    check_budget(options)
    return ranks_from_stats(options, module_stats(ckpt, selected, spec.needs, device))


def check_budget(options: AllocationOptions) -> None:
    """Refuse a params budget without an explicit total (before any spectrum is computed)."""
    if options.budget is None and options.budget_unit != "rank":
        raise ValidationError("a params budget needs an explicit --budget")


def ranks_from_stats(
    options: AllocationOptions, stats: Sequence[ModuleStats]
) -> tuple[dict[str, int], Allocation]:
    """``options.allocator``'s ranks for the modules of ``stats`` (see `allocated_ranks`)."""
    if options.allocator is None:
        raise ValidationError("no allocator named: pass --allocate (uniform, energy, ...)")
    check_budget(options)
    total = options.budget if options.budget is not None else options.rank * len(stats)
    alloc = allocate(
        options.allocator,
        stats,
        Budget(total, options.budget_unit),  # type: ignore[arg-type]
        min_rank=options.min_rank,
        max_rank=options.max_rank,
    )
    return alloc.ranks, alloc
