"""Rank allocators: exact budgets, min/max bounds, the documented formulas, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from _adapt_fixtures import one_thread  # noqa: F401
from hypothesis import given, settings
from hypothesis import strategies as st

from spectra.adapt.allocate import ALLOCATORS, Budget, ModuleStats, allocate
from spectra.errors import ValidationError


def _mods(n: int = 6, seed: int = 0) -> list[ModuleStats]:
    rng = np.random.default_rng(seed)
    shapes = [(64, 64), (64, 256), (256, 64), (32, 32)]
    out = []
    for i in range(n):
        shape = shapes[i % len(shapes)]
        S = np.sort(rng.pareto(1.5 + i % 3, min(shape)) + 0.1)[::-1]
        out.append(ModuleStats(f"l{i // 2}.m{i}", shape, i // 2, S, 2.0 + 0.7 * i))
    return out


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
@pytest.mark.parametrize("total", [6, 37, 200])
def test_rank_budget_is_exact_and_bounds_hold(name: str, total: int) -> None:
    mods = _mods()
    a = allocate(name, mods, Budget(total), min_rank=1, max_rank=60)
    assert sum(a.ranks.values()) == total == a.used
    assert all(1 <= r <= min(60, min(m.shape)) for m, r in zip(mods, a.ranks.values(), strict=True))
    assert a.params == sum(r * m.cost for m, r in zip(mods, a.ranks.values(), strict=True))


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
def test_params_budget_fills_without_overshoot(name: str) -> None:
    mods = _mods()
    total = 20_000
    a = allocate(name, mods, Budget(total, "params"), min_rank=0, max_rank=40)
    assert a.used == a.params <= total
    growable = [m.cost for m, r in zip(mods, a.ranks.values(), strict=True) if r < 40]
    assert total - a.used < min(growable)


@settings(max_examples=40, deadline=None)
@given(
    total=st.integers(0, 120),
    lo=st.integers(0, 4),
    hi=st.integers(4, 40),
    name=st.sampled_from(sorted(ALLOCATORS)),
)
def test_exact_budget_property(total: int, lo: int, hi: int, name: str) -> None:
    mods = _mods(5, seed=1)
    cap = sum(min(hi, min(m.shape)) for m in mods)
    if not lo * len(mods) <= total <= cap:
        with pytest.raises(ValidationError, match="budget"):
            allocate(name, mods, Budget(total), min_rank=lo, max_rank=hi)
        return
    ranks = allocate(name, mods, Budget(total), min_rank=lo, max_rank=hi).ranks
    assert sum(ranks.values()) == total
    assert all(lo <= r <= hi for r in ranks.values())


def test_uniform_is_equal_up_to_one() -> None:
    mods = [ModuleStats(f"m{i}", (16, 16)) for i in range(5)]
    assert allocate("uniform", mods, Budget(40)).ranks == {f"m{i}": 8 for i in range(5)}
    ranks = list(allocate("uniform", mods, Budget(42)).ranks.values())
    assert ranks == [9, 9, 8, 8, 8]


def test_energy_takes_the_globally_largest_components() -> None:
    # Shares: a = [.5, .3, .2], b = [.9, .1]; budget 3 takes .9 (b), .5 (a), .3 (a).
    a = ModuleStats("a", (3, 3), spectrum=np.sqrt([5.0, 3.0, 2.0]))
    b = ModuleStats("b", (2, 2), spectrum=np.sqrt([9.0, 1.0]))
    assert allocate("energy", [a, b], Budget(3)).ranks == {"a": 2, "b": 1}
    # share=: smallest rank reaching 80% of each matrix's energy.
    assert allocate("energy", [a, b], share=0.8).ranks == {"a": 2, "b": 1}
    assert allocate("energy", [a, b], share=0.95).ranks == {"a": 3, "b": 2}


def test_alpha_power_follows_alpha_to_the_beta() -> None:
    mods = [ModuleStats(f"m{i}", (512, 512), layer=i, alpha=a) for i, a in enumerate([2.0, 4.0])]
    ranks = allocate("alpha-power", mods, Budget(330)).ranks
    w = np.array([2.0, 4.0]) ** 2.5
    want = 330 * w / w.sum()
    assert np.allclose(list(ranks.values()), want, atol=1)
    assert ranks["m1"] > ranks["m0"]  # less trained (higher alpha) gets more


def test_alpha_allocators_average_alpha_over_a_layer() -> None:
    mods = [
        ModuleStats("l0.q", (64, 64), 0, alpha=2.0),
        ModuleStats("l0.k", (64, 64), 0, alpha=4.0),
        ModuleStats("l1.q", (64, 64), 1, alpha=3.0),
    ]
    ranks = allocate("alpha-power", mods, Budget(30)).ranks
    assert len(set(ranks.values())) == 1  # every layer mean is 3
    split = allocate("alpha-power", mods, Budget(30), by_layer=False).ranks
    assert split["l0.k"] > split["l1.q"] > split["l0.q"]


def test_alpha_linear_maps_into_one_plus_minus_eps() -> None:
    mods = [ModuleStats(f"m{i}", (512, 512), i, alpha=a) for i, a in enumerate([2.0, 3.0, 6.0])]
    ranks = allocate("alpha-linear", mods, Budget(300), eps=0.5).ranks
    # weights 0.5, 0.75, 1.5 -> 300 * w / 2.75
    assert np.allclose(list(ranks.values()), [54.5, 81.8, 163.6], atol=1)
    flat = [ModuleStats(f"f{i}", (64, 64), i, alpha=3.0) for i in range(3)]
    assert set(allocate("alpha-linear", flat, Budget(30)).ranks.values()) == {10}


def test_errors_are_one_line_and_name_the_fix() -> None:
    mods = _mods(3)
    with pytest.raises(ValidationError, match="unknown allocator 'x'.*alpha-power.*energy"):
        allocate("x", mods, Budget(10))
    with pytest.raises(ValidationError, match="below the minimum 6 .*--min-rank"):
        allocate("uniform", mods, Budget(5), min_rank=2)
    with pytest.raises(ValidationError, match="exceeds the maximum 12"):
        allocate("uniform", mods, Budget(13), max_rank=4)
    with pytest.raises(ValidationError, match="min rank 40 exceeds min\\(m, n\\) = 32"):
        allocate("uniform", [ModuleStats("s", (32, 32))], Budget(40), min_rank=40)
    with pytest.raises(ValidationError, match="needs the spectrum"):
        allocate("energy", [ModuleStats("s", (8, 8))], Budget(2))
    with pytest.raises(ValidationError, match="need HT-SR alphas"):
        allocate("alpha-power", [ModuleStats("s", (8, 8))], Budget(2))
    with pytest.raises(ValidationError, match="no option"):
        allocate("uniform", mods, Budget(3), beta=2)
    with pytest.raises(ValidationError, match="non-negative integer"):
        Budget(-1)


def test_to_dict_records_the_choice() -> None:
    a = allocate("alpha-power", _mods(2), Budget(8), min_rank=1)
    d = a.to_dict()
    assert d["allocator"] == "alpha-power" and d["budget"] == {"total": 8, "unit": "rank"}
    assert d["options"]["beta"] == 2.5 and "AlphaLoRA" in d["formula"]
    assert sum(d["ranks"].values()) == 8
