"""LaMDA++: rank allocation from the normalized spectrum of the pretrained weights (our reading).

Azizi, Kundu, Pedram 2024, "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed
Low-Dimensional Adaptation", arXiv 2406.12832. LaMDA's adapter is ``dW = B S A`` with ``A``
(PMA, ``(r, in)``) frozen, a small trainable square ``S (r, r)`` and ``B`` (PMB, ``(out, r)``)
frozen progressively early in training, both projections initialized from singular vectors of
the pretrained weight. LaMDA++ adds a "lite-weight" per-layer rank allocation "via normalized
spectrum analysis of pre-trained model weights".

**This is an energy-based reading, not the paper's formula.** The paper's exact score and budget
rule are not public in any source we found (and the released code has no SVD initialization).
What we implement, named ``lamda++ (energy reading)`` everywhere it is recorded:

    normalized spectrum   e_lj = S_lj^2 / sum_i S_li^2       (each layer's energy sums to 1)
    tail energy           E_l  = sum_{j >= r0} e_lj           (energy a base rank r0 misses)
    ranks                 r_l  proportional to E_l, exactly on the budget
                          (Sainte-Lague highest averages, quotient E_l / (2 k + 1))

so a layer whose spectrum is flat (much energy beyond its top r0 directions) gets more rank than
one whose energy sits in a few directions. ``r0`` (``base_rank``, default 8) is an option. The
allocator is one ``AllocatorSpec`` in the registry (spectra.adapt.allocate), so it can be swapped
for the paper's rule if that becomes known.

What PEFT can express (the export): a plain LoRA with ``A = diag(sqrt(S_r / s)) Vh_r``,
``B = U_r diag(sqrt(S_r / s))`` (the top-r singular triplets, S folded into both factors) and the
residual base ``W - s B A``: the same start point as LaMDA's projections with S folded in.
What it cannot: a separate trainable ``S (r, r)`` between frozen ``A`` and ``B``, and the
progressive freezing of ``B``. In PEFT all of A and B train; to approximate LaMDA, freeze
``lora_A`` yourself (``requires_grad_(False)``) and train ``lora_B``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from torch import Tensor

from spectra.adapt.allocate import AllocatorSpec, ModuleStats, register_allocator
from spectra.adapt.factorize import factorize
from spectra.adapt.registry import Factors, InitContext, register_initializer
from spectra.adapt.svd import top_svd
from spectra.errors import ValidationError

ALLOCATOR_NAME = "lamda++"
READING = "lamda++ (energy reading): r_l ~ E_l = sum_{j>=r0} S_lj^2 / sum_j S_lj^2"
DEFAULT_BASE_RANK = 8
PEFT_LIMITS = (
    "exported as plain LoRA with S folded into A and B; not expressible in PEFT: "
    "trainable S (r x r) between frozen A and B, progressive freezing of B"
)


def tail_energy(spectrum: np.ndarray | Tensor, base_rank: int) -> float:
    """``E = sum_{j >= r0} S_j^2 / sum_j S_j^2`` (share of a matrix's energy beyond rank r0).

    >>> round(tail_energy(np.array([2.0, 1.0, 1.0]), 1), 6)
    0.333333
    """
    if base_rank < 0:
        raise ValidationError(f"base rank must be >= 0, got {base_rank}")
    energy = np.asarray(spectrum, dtype=np.float64) ** 2
    total = float(energy.sum())
    if total <= 0:
        return 0.0
    return float(energy[base_rank:].sum()) / total


def _lamda_scores(
    mods: Sequence[ModuleStats], max_ranks: Sequence[int], opts: dict[str, Any]
) -> list[np.ndarray]:
    base = int(opts["base_rank"])
    weights = []
    for mod in mods:
        if mod.spectrum is None:
            raise ValidationError(
                f"the {ALLOCATOR_NAME} allocator needs the spectrum of {mod.key!r}"
            )
        weights.append(tail_energy(mod.spectrum, base))
    # Sainte-Lague quotients: the greedy pass gives ranks proportional to the weights.
    return [w / (2.0 * np.arange(r) + 1.0) for w, r in zip(weights, max_ranks, strict=True)]


LAMDA_ALLOCATOR = register_allocator(
    AllocatorSpec(
        ALLOCATOR_NAME,
        _lamda_scores,
        READING,
        "spectrum",
        {"base_rank": DEFAULT_BASE_RANK},
    )
)


class LaMDAPlusPlus:
    """Top-r singular triplets with S folded into A and B; base is the residual (see module doc)."""

    name: ClassVar[str] = ALLOCATOR_NAME
    mutates_base: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    # init_adapter uses this allocator when the user names none: LaMDA++ is its rank rule.
    default_allocator: ClassVar[str] = ALLOCATOR_NAME
    description: ClassVar[str] = (
        "LaMDA++ (energy reading of arXiv 2406.12832): ranks from the normalized weight "
        "spectrum, top-r SVD factors; PEFT cannot hold LaMDA's frozen-A / trainable-S structure"
    )

    def init(self, W: Tensor, rank: int, scale: float, ctx: InitContext) -> Factors:
        U, S, Vh, info = top_svd(W, rank, ctx)
        A, B = factorize(U, S, Vh, scale)
        info.update({"reading": READING, "peft_limits": PEFT_LIMITS})
        return Factors(A.float(), B.float(), info)


register_initializer(LaMDAPlusPlus())
