"""MiLoRA: adapt the minor (bottom-r) singular components, keep the principal ones frozen.

Wang et al. 2024, "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM
Finetuning", arXiv 2406.09044. The same factorization as PiSSA on the last r components of the
thin SVD; the bottom of a spectrum cannot come from a randomized top-k, so the SVD is always exact
and in float64 (the smallest singular values of a float32 matrix are where float32 SVDs lose
relative accuracy first).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from spectra.adapt.factorize import factorize
from spectra.adapt.registry import Factors, InitContext, register_initializer
from spectra.adapt.svd import full_svd


class MiLoRA:
    name: ClassVar[str] = "milora"
    mutates_base: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    description: ClassVar[str] = "bottom-r singular components (arXiv 2406.09044)"

    def init(self, W: Tensor, rank: int, scale: float, ctx: InitContext) -> Factors:
        U, S, Vh = full_svd(W, dtype=torch.float64)
        U, S, Vh = U[:, -rank:], S[-rank:], Vh[-rank:]  # (m, r), (r,), (r, n)
        A, B = factorize(U, S, Vh, scale)
        info = {"svd": "exact", "sigma_kept": [float(S[0]), float(S[-1])]}
        return Factors(A.float(), B.float(), info)


register_initializer(MiLoRA())
