"""Rank allocators: one interface, budget in, ``{module key: rank}`` out, exactly on budget.

Every allocator scores the ``j``-th rank unit of every module (``j = 0, 1, ...``), scores never
increasing in ``j`` within a module; one greedy pass then hands out units in score order
(ties: module order, then unit order), after each module got its ``min_rank`` and never past its
``max_rank`` (default ``min(m, n)``). Because the score order is global the result is the
optimum of the allocator's objective for a budget in total rank, and exact:

- ``unit="rank"``: ``sum r_l == total``.
- ``unit="params"`` (trainable parameters ``sum r_l (m_l + n_l)``): ``used <= total`` and no module
  that may still grow fits in what is left (``total - used < m_l + n_l``); an exact hit is not
  always possible with integer ranks. Units are taken in score order, skipping a unit that does
  not fit (and so the rest of that module).

Allocators (``ALLOCATORS``; methods.md section 5):

- ``uniform``: equal ranks (+-1 when the budget does not divide).
- ``energy``: score of unit j of module l = ``S_{l,j}^2 / sum_i S_{l,i}^2``, its share of the
  matrix's spectral energy; greedy = one global threshold on that share. Without a budget,
  ``share=`` gives each module the smallest rank reaching that share of its energy.
- ``alpha-power`` (AlphaLoRA, Qing et al. 2024, arXiv 2410.10054): weight ``alpha_l^beta``
  (beta = 2.5) with ``alpha_l`` the mean HT-SR alpha of the module's layer; ranks proportional to
  the weights (Sainte-Lague highest averages, quotient ``w / (2 j + 1)``).
- ``alpha-linear`` (AlphaPruning, Lu et al. 2024, arXiv 2410.10912): ``alpha_l`` mapped linearly
  onto ``[1 - eps, 1 + eps]`` (eps = 0.3), ranks proportional to that. Higher alpha (a less
  trained layer, Martin & Mahoney) gets more rank in both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from spectra.errors import ValidationError

BudgetUnit = Literal["rank", "params"]


@dataclass(frozen=True)
class ModuleStats:
    """What an allocator may look at for one target matrix ``(m, n) = (out, in)``.

    spectrum: singular values, descending (needed by ``energy``); alpha: HT-SR power-law exponent
    of the matrix (needed by the alpha allocators; None where the fit failed).
    """

    key: str
    shape: tuple[int, int]
    layer: int | None = None
    spectrum: np.ndarray | None = field(default=None, repr=False, compare=False)
    alpha: float | None = None

    @property
    def cost(self) -> int:
        """Trainable parameters per rank unit: ``m + n``."""
        return int(self.shape[0] + self.shape[1])


@dataclass(frozen=True)
class Budget:
    """A budget of ``total`` ranks summed over modules, or ``total`` trainable parameters."""

    total: int
    unit: BudgetUnit = "rank"

    def __post_init__(self) -> None:
        if self.unit not in ("rank", "params"):
            raise ValidationError(f"budget unit {self.unit!r} must be 'rank' or 'params'")
        if isinstance(self.total, bool) or int(self.total) != self.total or self.total < 0:
            raise ValidationError(f"budget must be a non-negative integer, got {self.total!r}")


@dataclass(frozen=True)
class Allocation:
    """Chosen ranks; ``used``: total rank or parameters spent, in the budget's unit."""

    ranks: dict[str, int]
    allocator: str
    budget: Budget | None
    used: int
    params: int
    options: dict[str, Any] = field(default_factory=dict)
    formula: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "allocator": self.allocator,
            "formula": self.formula,
            "budget": None if self.budget is None else asdict(self.budget),
            "used": self.used,
            "params": self.params,
            "options": dict(self.options),
            "ranks": dict(self.ranks),
        }


ScoreFn = Callable[[Sequence[ModuleStats], Sequence[int], dict[str, Any]], list[np.ndarray]]


@dataclass(frozen=True)
class AllocatorSpec:
    """One allocator: ``scores(modules, max_ranks, options)`` -> per-module non-increasing score
    arrays of length ``max_rank``; ``needs``: "spectrum", "alpha" or None."""

    name: str
    scores: ScoreFn
    formula: str
    needs: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)


ALLOCATORS: dict[str, AllocatorSpec] = {}


def register_allocator(spec: AllocatorSpec) -> AllocatorSpec:
    ALLOCATORS[spec.name] = spec
    return spec


def _proportional(weights: Sequence[float], max_ranks: Sequence[int]) -> list[np.ndarray]:
    # Sainte-Lague quotients: the greedy gives ranks proportional to the weights.
    return [w / (2.0 * np.arange(r) + 1.0) for w, r in zip(weights, max_ranks, strict=True)]


def _uniform_scores(mods, max_ranks, opts) -> list[np.ndarray]:
    return _proportional([1.0] * len(mods), max_ranks)


def _energy_scores(mods, max_ranks, opts) -> list[np.ndarray]:
    out = []
    for mod, r in zip(mods, max_ranks, strict=True):
        if mod.spectrum is None:
            raise ValidationError(f"the energy allocator needs the spectrum of {mod.key!r}")
        energy = np.asarray(mod.spectrum, dtype=np.float64) ** 2
        total = float(energy.sum())
        share = energy / total if total > 0 else np.zeros_like(energy)
        out.append(np.pad(share[:r], (0, max(0, r - share.size))))
    return out


def _layer_alphas(mods: Sequence[ModuleStats], by_layer: bool) -> list[float]:
    known = [m.alpha for m in mods if m.alpha is not None and math.isfinite(m.alpha)]
    if not known:
        raise ValidationError("the alpha allocators need HT-SR alphas; none of the targets has one")
    fill = float(np.mean(known))
    alphas = [m.alpha if m.alpha is not None and math.isfinite(m.alpha) else fill for m in mods]
    if not by_layer:
        return alphas
    groups: dict[Any, list[float]] = {}
    for m, a in zip(mods, alphas, strict=True):
        groups.setdefault(m.layer if m.layer is not None else m.key, []).append(a)
    return [float(np.mean(groups[m.layer if m.layer is not None else m.key])) for m in mods]


def _alpha_power_scores(mods, max_ranks, opts) -> list[np.ndarray]:
    alphas = _layer_alphas(mods, opts["by_layer"])
    return _proportional([a ** opts["beta"] for a in alphas], max_ranks)


def _alpha_linear_scores(mods, max_ranks, opts) -> list[np.ndarray]:
    alphas = np.asarray(_layer_alphas(mods, opts["by_layer"]))
    eps = float(opts["eps"])
    if not 0 <= eps < 1:
        raise ValidationError(f"alpha-linear eps must be in [0, 1), got {eps}")
    span = float(alphas.max() - alphas.min())
    unit = (alphas - alphas.min()) / span if span > 0 else np.full_like(alphas, 0.5)
    return _proportional(list((1 - eps) + 2 * eps * unit), max_ranks)


register_allocator(AllocatorSpec("uniform", _uniform_scores, "r_l equal (+-1)"))
register_allocator(
    AllocatorSpec("energy", _energy_scores, "score_lj = S_lj^2 / sum_i S_li^2", "spectrum")
)
register_allocator(
    AllocatorSpec(
        "alpha-power",
        _alpha_power_scores,
        "r_l ~ alpha_l^beta (AlphaLoRA), alpha_l = mean alpha of layer l",
        "alpha",
        {"beta": 2.5, "by_layer": True},
    )
)
register_allocator(
    AllocatorSpec(
        "alpha-linear",
        _alpha_linear_scores,
        "r_l ~ 1 - eps + 2 eps (alpha_l - min) / (max - min) (AlphaPruning)",
        "alpha",
        {"eps": 0.3, "by_layer": True},
    )
)


def get_allocator(name: str) -> AllocatorSpec:
    """The registered allocator ``name`` (case-insensitive); the error lists the known ones."""
    from spectra.adapt.registry import load_builtins

    load_builtins()
    found = ALLOCATORS.get(name.lower())
    if found is None:
        raise ValidationError(
            f"unknown allocator {name!r}: choose one of {', '.join(sorted(ALLOCATORS))}"
        )
    return found


def allocate(
    name: str,
    modules: Sequence[ModuleStats],
    budget: Budget | None = None,
    *,
    min_rank: int = 0,
    max_rank: int | None = None,
    share: float | None = None,
    **options: Any,
) -> Allocation:
    """Ranks for ``modules`` from allocator ``name`` under ``budget`` (see module docstring).

    min_rank / max_rank bound every module (max also by ``min(m, n)``); rank 0 means no adapter
    on that module. ``share`` (energy only, instead of a budget): smallest rank reaching that
    share of each matrix's ``sum S^2``. Options override the allocator's defaults.

    >>> mods = [ModuleStats("a", (8, 8)), ModuleStats("b", (8, 8)), ModuleStats("c", (8, 8))]
    >>> allocate("uniform", mods, Budget(7)).ranks
    {'a': 3, 'b': 2, 'c': 2}
    """
    spec = get_allocator(name)
    if not modules:
        raise ValidationError("no modules to allocate ranks to")
    unknown = set(options) - set(spec.defaults)
    if unknown:
        raise ValidationError(
            f"allocator {spec.name!r} has no option(s) {sorted(unknown)}; "
            f"it takes {sorted(spec.defaults) or 'none'}"
        )
    opts = {**spec.defaults, **options}
    lows, highs = _bounds(modules, min_rank, max_rank)
    if share is not None:
        ranks = _by_share(spec, modules, highs, lows, share)
        used_budget = None
    else:
        if budget is None:
            raise ValidationError(f"allocator {spec.name!r} needs a budget")
        scores = spec.scores(modules, highs, opts)
        ranks = _greedy(modules, scores, lows, highs, budget)
        used_budget = budget
    rank_map = {m.key: int(r) for m, r in zip(modules, ranks, strict=True)}
    params = sum(r * m.cost for m, r in zip(modules, ranks, strict=True))
    used = params if used_budget is not None and used_budget.unit == "params" else sum(ranks)
    recorded = dict(opts, min_rank=min_rank, max_rank=max_rank)
    if share is not None:
        recorded["share"] = share
    return Allocation(
        rank_map, spec.name, used_budget, int(used), int(params), recorded, spec.formula
    )


def _bounds(
    modules: Sequence[ModuleStats], min_rank: int, max_rank: int | None
) -> tuple[list[int], list[int]]:
    if min_rank < 0:
        raise ValidationError(f"min rank must be >= 0, got {min_rank}")
    if max_rank is not None and max_rank < min_rank:
        raise ValidationError(f"max rank {max_rank} is below min rank {min_rank}")
    highs = [min(m.shape) if max_rank is None else min(max_rank, min(m.shape)) for m in modules]
    for m, h in zip(modules, highs, strict=True):
        if h < min_rank:
            raise ValidationError(
                f"min rank {min_rank} exceeds min(m, n) = {h} of {m.key!r} {m.shape}: "
                "lower --min-rank or exclude that module"
            )
    return [min_rank] * len(modules), highs


def _greedy(
    modules: Sequence[ModuleStats],
    scores: list[np.ndarray],
    lows: list[int],
    highs: list[int],
    budget: Budget,
) -> list[int]:
    costs = [1 if budget.unit == "rank" else m.cost for m in modules]
    floor = sum(lo * c for lo, c in zip(lows, costs, strict=True))
    ceiling = sum(hi * c for hi, c in zip(highs, costs, strict=True))
    what = "total rank" if budget.unit == "rank" else "trainable parameters"
    if budget.total < floor:
        raise ValidationError(
            f"budget {budget.total} {what} is below the minimum {floor} that min rank "
            f"{lows[0]} on {len(modules)} modules needs: raise the budget or lower --min-rank"
        )
    if budget.total > ceiling:
        raise ValidationError(
            f"budget {budget.total} {what} exceeds the maximum {ceiling} the modules can take "
            "(every module at its max rank): lower the budget or raise --max-rank"
        )
    cand_mod, cand_unit, cand_score = [], [], []
    for i, (sc, lo, hi) in enumerate(zip(scores, lows, highs, strict=True)):
        cand_mod.append(np.full(hi - lo, i))
        cand_unit.append(np.arange(lo, hi))
        cand_score.append(np.asarray(sc[lo:hi], dtype=np.float64))
    mod, unit, score = (np.concatenate(x) for x in (cand_mod, cand_unit, cand_score))
    order = np.lexsort((unit, mod, -score))  # score descending, then module, then unit
    ranks = list(lows)
    left = budget.total - floor
    for i in mod[order]:
        if left == 0:
            break
        if costs[i] <= left:
            ranks[i] += 1
            left -= costs[i]
    return ranks


def _by_share(
    spec: AllocatorSpec,
    modules: Sequence[ModuleStats],
    highs: list[int],
    lows: list[int],
    share: float,
) -> list[int]:
    if spec.name != "energy":
        raise ValidationError(f"share= is only for the energy allocator, not {spec.name!r}")
    if not 0 < share <= 1:
        raise ValidationError(f"energy share must be in (0, 1], got {share}")
    ranks = []
    for mod, lo, hi in zip(modules, lows, highs, strict=True):
        shares = _energy_scores([mod], [min(mod.shape)], {})[0]
        reach = int(np.searchsorted(np.cumsum(shares), share - 1e-12) + 1)
        ranks.append(max(lo, min(hi, reach)))
    return ranks
