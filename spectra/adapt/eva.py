"""EVA: explained-variance adaptation, A from the principal directions of a layer's inputs.

Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation", arXiv 2410.07170 (methods.md section 4). Per target layer, the incremental SVD of its
mean-centred calibration inputs (spectra.adapt.stats.IncrementalSVD) runs until the leading
components converge (|cos| to the previous estimate >= tau per component, up to the layer's
current rank) or a cap on batches is hit; then ``A = top-r right singular vectors (r, in)``,
``B = 0 (out, r)``: the base is unchanged and the output is unchanged at initialization.

Rank redistribution (rho >= 1): each layer computes ``round(rho * r_l)`` components; each
component is scored by its explained-variance ratio within its layer (``S_i^2 / total centred
sum of squares``); the global top ``sum_l r_l`` scores are kept and a layer's rank is how many of
its own it keeps (0: no adapter there). Layers that share an input (q, k, v) share one SVD and
each competes with its own copy of the scores, as in the paper's reference implementation. With
``adjust_scaling_factors`` a layer's alpha becomes ``alpha * r_l / r``.

Differences from PEFT's ``initialize_lora_eva_weights`` on purpose: a cap on batches (PEFT cycles
the data loader until convergence, which never ends on a layer that does not converge) and
sign-invariant convergence (|cos|; an SVD may flip a vector's sign between batches).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from spectra.adapt.calib_collect import ConvergenceRanks
from spectra.adapt.registry import Factors, InitContext, register_initializer
from spectra.adapt.stats import CalibrationStats, SVDState
from spectra.errors import ValidationError

DEFAULT_RHO = 2.0  # paper default: compute twice the rank, keep the globally best half
DEFAULT_TAU = 0.99


def components_per_layer(ranks: Mapping[str, int], rho: float = DEFAULT_RHO) -> dict[str, int]:
    """``round(rho * r_l)`` per module (at least r_l): how many components calibration computes."""
    if rho < 1:
        raise ValidationError(f"rho must be >= 1 (components computed per unit of rank), got {rho}")
    return {name: max(int(r), int(round(rho * r))) for name, r in ranks.items()}


def redistribute_ranks(
    evr: Mapping[str, Tensor],
    ranks: Mapping[str, int],
    rho: float = DEFAULT_RHO,
    *,
    max_ranks: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """EVA's global rank redistribution.

    Args:
        evr: module -> explained-variance ratios of its input components, descending (modules
            that share an input get the same tensor).
        ranks: module -> initial rank r_l; the budget is ``sum r_l``.
        rho: each module offers its first ``round(rho * r_l)`` components.
        max_ranks: optional per-module cap (e.g. ``min(out, in)``).

    Returns:
        module -> new rank, summing exactly to ``sum r_l`` when enough components are offered
        (always when rho >= 1 and every module has r_l components); zero means no adapter.
        Ties break by module order (as given in `ranks`), then component index.

    >>> redistribute_ranks({"a": torch.tensor([.5, .3]), "b": torch.tensor([.1, .05])},
    ...                    {"a": 1, "b": 1})
    {'a': 2, 'b': 0}
    """
    names = list(ranks)
    offer = components_per_layer(ranks, rho)
    budget = int(sum(ranks.values()))
    mod, unit, score = [], [], []
    for i, name in enumerate(names):
        if name not in evr:
            raise ValidationError(f"no explained-variance ratios for {name}")
        k = min(offer[name], int(evr[name].shape[0]))
        if max_ranks is not None and name in max_ranks:
            k = min(k, int(max_ranks[name]))
        mod.append(np.full(k, i))
        unit.append(np.arange(k))
        score.append(evr[name][:k].double().cpu().numpy())
    m, u, s = (np.concatenate(x) if x else np.zeros(0) for x in (mod, unit, score))
    order = np.lexsort((u, m, -s))[:budget]
    counts = np.bincount(m[order].astype(np.int64), minlength=len(names))
    return {name: int(c) for name, c in zip(names, counts, strict=True)}


def adjusted_alphas(
    alpha: float | Mapping[str, float],
    old: Mapping[str, int],
    new: Mapping[str, int],
    *,
    rslora: bool = False,
) -> dict[str, float]:
    """``adjust_scaling_factors``: the alpha per module that keeps its LoRA scale through the
    redistribution from ``old`` to ``new`` ranks (rank-0 modules omitted).

    LoRA (scale ``alpha / r``): ``alpha_l = alpha * r_l_new / r_l_old``; rsLoRA (scale
    ``alpha / sqrt(r)``): ``alpha_l = alpha * sqrt(r_l_new / r_l_old)``. ``alpha`` is one value
    for every module or one per module (keys of ``old``).

    >>> adjusted_alphas(8.0, {"a": 4}, {"a": 1})
    {'a': 2.0}
    >>> adjusted_alphas(8.0, {"a": 4}, {"a": 1}, rslora=True)
    {'a': 4.0}
    """
    out = {}
    for name, r_new in new.items():
        if r_new <= 0:
            continue
        base = float(alpha[name] if isinstance(alpha, Mapping) else alpha)
        ratio = r_new / old[name]
        out[name] = base * (math.sqrt(ratio) if rslora else ratio)
    return out


def eva_alphas(
    alpha: float | None,
    before: Mapping[str, int],
    after: Mapping[str, int],
    *,
    adjust_scaling: bool = True,
    rslora: bool = False,
) -> dict[str, float] | None:
    """The alpha per module after EVA moved its rank from ``before`` to ``after`` (weight key ->
    rank; rank-0 modules omitted), or None to keep the plan's rule (one ``alpha`` for every
    module).

    ``adjust_scaling`` (PEFT's ``adjust_scaling_factors``): each module keeps the LoRA scale it
    had before redistribution (`adjusted_alphas`), from ``alpha``, or from ``alpha = r_old`` when
    ``alpha`` is None (the tool's default ``alpha = r``). Without it, ``alpha`` None still means
    ``alpha = r_old`` per module.

    >>> eva_alphas(8.0, {"a": 4, "b": 4}, {"a": 6, "b": 2})
    {'a': 12.0, 'b': 4.0}
    >>> eva_alphas(None, {"a": 4, "b": 4}, {"a": 6, "b": 0}, adjust_scaling=False)
    {'a': 4.0}
    """
    if adjust_scaling:
        base = {k: float(before[k]) if alpha is None else float(alpha) for k in after}
        old = {k: int(before[k]) for k in after}
        return adjusted_alphas(base, old, after, rslora=rslora)
    if alpha is None:
        return {k: float(before[k]) for k, new in after.items() if new > 0}
    return None


def convergence_ranks(
    ranks: Mapping[str, int], shared: Mapping[str, str] | None = None, rho: float = DEFAULT_RHO
) -> ConvergenceRanks:
    """The stopping rule calibration uses: a leader must converge up to the largest current rank
    of its members under the redistribution computed from the current estimates."""
    shared = dict(shared or {})

    def needed(evr_by_leader: Mapping[str, Tensor]) -> dict[str, int]:
        present = {n: r for n, r in ranks.items() if shared.get(n, n) in evr_by_leader}
        evr = {n: evr_by_leader[shared.get(n, n)] for n in present}
        current = redistribute_ranks(evr, present, rho)
        out: dict[str, int] = {}
        for name, r in current.items():
            lead = shared.get(name, name)
            out[lead] = max(out.get(lead, 0), r)
        return out

    return needed


def eva_ranks(
    stats: CalibrationStats,
    ranks: Mapping[str, int],
    rho: float = DEFAULT_RHO,
    *,
    max_ranks: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Redistributed ranks from finished calibration statistics (modules without stats: 0)."""
    usable = {n: r for n, r in ranks.items() if stats.leader(n) in stats.svd}
    evr = {n: stats.svd_state(n).explained_variance_ratio() for n in usable}
    new = redistribute_ranks(evr, usable, rho, max_ranks=max_ranks) if usable else {}
    return {n: new.get(n, 0) for n in ranks}


def eva_factors(state: SVDState, rank: int, out_features: int) -> tuple[Tensor, Tensor]:
    """``A = components[:rank] (rank, in)``, ``B = 0 (out, rank)``, float32."""
    have = int(state.components.shape[0])
    if not 1 <= rank <= have:
        raise ValidationError(
            f"EVA rank {rank} needs that many input components; calibration computed {have}: "
            "raise rho or use more calibration tokens"
        )
    A = state.components[:rank].to(torch.float32).clone()
    B = torch.zeros(out_features, rank, dtype=torch.float32)
    return A, B


class EVA:
    name: ClassVar[str] = "eva"
    mutates_base: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = True
    description: ClassVar[str] = (
        "EVA: A = top principal directions of the layer inputs, B = 0 (arXiv 2410.07170)"
    )

    def init(self, W: Tensor, rank: int, scale: float, ctx: InitContext) -> Factors:
        stats = ctx.stats
        if isinstance(stats, CalibrationStats):
            state = stats.svd_state(ctx.module)
        elif isinstance(stats, SVDState):
            state = stats
        else:
            raise ValidationError(
                f"EVA needs the activation SVD of {ctx.module}: run calibration (--calib) "
                "or pass saved statistics (--stats)"
            )
        A, B = eva_factors(state, rank, int(W.shape[0]))
        info = {
            "converged": bool(state.converged[:rank].all()),
            "batches": state.batches,
            "tokens": state.count,
            "explained_variance": float(state.explained_variance_ratio()[:rank].sum()),
        }
        return Factors(A.to(W.device), B.to(W.device), info)


register_initializer(EVA())
