"""Turn a trained adapter whose initialization changed the base (PiSSA, MiLoRA, OLoRA, CorDA)
into a plain LoRA on the original, unmodified base: the pure conversion of two adapters in memory
(the job that reads and writes the folders: spectra.jobs.convert).

docs/methods.md section 4: with the initial factors ``A0, B0`` and the trained ``A, B``
(same scale ``s``), the original base is ``W = W_res + s B0 A0``, so the trained model
``W_res + s B A = W + s (B A - B0 A0)``. A rank-2r LoRA with ``A' = [A; A0]`` ``(2r, in)``,
``B' = [B, -B0]`` ``(out, 2r)`` gives exactly that delta if its scale is still ``s``: alpha doubles
(``2 alpha / 2r = alpha / r``), or is multiplied by sqrt(2) under rsLoRA
(``sqrt(2) alpha / sqrt(2r) = alpha / sqrt(r)``). PEFT's
``path_initial_model_for_weight_conversion`` does the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from spectra.errors import ValidationError
from spectra.formats.peft import PeftAdapter


def stack_factors(A: Tensor, B: Tensor, A0: Tensor, B0: Tensor) -> tuple[Tensor, Tensor]:
    """``A' = [A; A0] (2r, in)``, ``B' = [B, -B0] (out, 2r)`` so ``B' A' = B A - B0 A0``."""
    if A.shape != A0.shape or B.shape != B0.shape:
        raise ValidationError(
            f"trained factors A {tuple(A.shape)}, B {tuple(B.shape)} do not match the initial "
            f"A {tuple(A0.shape)}, B {tuple(B0.shape)}: was the adapter trained from this init?"
        )
    A0 = A0.to(A.dtype)
    B0 = B0.to(B.dtype)
    return torch.cat([A, A0], dim=0), torch.cat([B, -B0], dim=1)


def doubled_alpha(alpha: float, *, rslora: bool) -> float:
    """Alpha of the rank-2r LoRA with the same scale: ``2 alpha`` (LoRA), ``sqrt(2) alpha``
    (rsLoRA)."""
    return alpha * (math.sqrt(2.0) if rslora else 2.0)


@dataclass(frozen=True)
class Converted:
    """The rank-2r adapter's factors and alphas, by module path."""

    factors: dict[str, tuple[Tensor, Tensor]]
    alphas: dict[str, float]
    rslora: bool


def convert_adapters(init: PeftAdapter, trained: PeftAdapter) -> Converted:
    """Pure conversion of two adapters in memory (see module docstring)."""
    if set(init.factors) != set(trained.factors):
        only = sorted(set(init.factors) ^ set(trained.factors))[:3]
        raise ValidationError(
            f"initial and trained adapters target different modules (e.g. {only}): "
            "pass the init that this adapter was trained from"
        )
    rslora = trained.settings.use_rslora
    if rslora != init.settings.use_rslora:
        raise ValidationError("initial and trained adapters disagree on use_rslora")
    factors, alphas = {}, {}
    for module in sorted(trained.factors):
        s0, s1 = init.scale(module), trained.scale(module)
        if not math.isclose(s0, s1, rel_tol=1e-6):
            raise ValidationError(
                f"{module}: the LoRA scale changed between init ({s0}) and training ({s1})"
            )
        A, B = trained.factors[module]
        A0, B0 = init.factors[module]
        factors[module] = stack_factors(A, B, A0, B0)
        alphas[module] = doubled_alpha(trained.alpha(module), rslora=rslora)
    return Converted(factors, alphas, rslora)


# Trained-adapter settings that stay true for the converted one: the extra trained modules
# (a classifier head; its tensors are copied as they are, and PEFT ignores them unless listed)
# and the task type (which PeftModel class wraps the base).
CARRIED_KEYS = ("modules_to_save", "task_type")


def carried_config(trained: PeftAdapter) -> dict[str, object]:
    """The ``CARRIED_KEYS`` of the trained adapter's config that it sets."""
    return {k: trained.config[k] for k in CARRIED_KEYS if trained.config.get(k) is not None}
