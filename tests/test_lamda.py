"""LaMDA++ (energy reading of arXiv 2406.12832): allocator and PEFT-expressible factors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _adapt_fixtures import one_thread  # noqa: F401

from spectra.adapt.allocate import Budget, ModuleStats, allocate
from spectra.adapt.lamda import ALLOCATOR_NAME, PEFT_LIMITS, READING, tail_energy
from spectra.adapt.registry import InitContext, get_initializer
from spectra.errors import ValidationError


def test_tail_energy_is_the_normalized_energy_beyond_the_base_rank():
    S = np.array([3.0, 2.0, 1.0, 1.0])
    assert tail_energy(S, 0) == 1.0
    assert tail_energy(S, 2) == pytest.approx(2.0 / 15.0)
    assert tail_energy(S * 7.5, 2) == pytest.approx(2.0 / 15.0)  # scale-free
    assert tail_energy(np.zeros(3), 1) == 0.0
    with pytest.raises(ValidationError, match="base rank must be >= 0, got -1"):
        tail_energy(S, -1)


def _mods() -> list[ModuleStats]:
    n = 32
    flat = np.ones(n)  # energy spread: much of it beyond any small base rank
    steep = 0.5 ** np.arange(n)  # energy in the first few directions
    mid = 1.0 / np.sqrt(np.arange(1, n + 1))
    return [
        ModuleStats("flat", (n, n), 0, flat),
        ModuleStats("steep", (n, n), 0, steep),
        ModuleStats("mid", (n, n), 1, mid),
    ]


def test_allocator_is_exact_and_proportional_to_tail_energy():
    mods = _mods()
    alloc = allocate(ALLOCATOR_NAME, mods, Budget(30), min_rank=0, base_rank=4)
    assert sum(alloc.ranks.values()) == 30
    assert alloc.ranks["flat"] > alloc.ranks["mid"] > alloc.ranks["steep"]
    weights = np.array([tail_energy(m.spectrum, 4) for m in mods])
    ideal = 30 * weights / weights.sum()
    got = np.array([alloc.ranks[m.key] for m in mods])
    assert np.abs(got - ideal).max() <= 1.0  # Sainte-Lague: within one seat of proportional
    assert alloc.formula == READING and "energy reading" in alloc.formula
    assert alloc.options["base_rank"] == 4
    # min/max per module are honoured and the budget stays exact.
    capped = allocate(ALLOCATOR_NAME, mods, Budget(30), min_rank=2, max_rank=12)
    assert sum(capped.ranks.values()) == 30
    assert all(2 <= r <= 12 for r in capped.ranks.values())


def test_allocator_needs_spectra():
    with pytest.raises(ValidationError, match="needs the spectrum of 'x'"):
        allocate(ALLOCATOR_NAME, [ModuleStats("x", (4, 4))], Budget(2))


def test_initializer_exports_top_r_with_s_folded_and_states_what_peft_lacks():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 9, generator=g)
    init = get_initializer(ALLOCATOR_NAME)
    assert init.mutates_base and not init.needs_calibration
    f = init.init(W, 3, 0.5, InitContext(key="w", module="w", svd="exact"))
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    top = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    torch.testing.assert_close((0.5 * f.B @ f.A).double(), top, rtol=1e-5, atol=1e-5)
    assert f.info["peft_limits"] == PEFT_LIMITS and "trainable S" in PEFT_LIMITS
    assert f.info["reading"] == READING
