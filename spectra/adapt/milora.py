"""MiLoRA: adapt the minor (bottom-r) singular components, keep the principal ones frozen.

Wang et al. 2024, "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM
Finetuning", arXiv 2406.09044. The same factorization as PiSSA on the last r components of the
thin SVD; the bottom of a spectrum cannot come from a randomized top-k, so the decomposition is
always exact and in float64 (spectra.linalg.exact.exact_svd_slice: float64 Gram eigenvectors,
or the full float64 SVD for nearly rank-deficient matrices).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from spectra.adapt.factorize import factorize
from spectra.adapt.registry import Factors, InitContext, register_initializer
from spectra.linalg.exact import exact_svd_slice


class MiLoRA:
    name: ClassVar[str] = "milora"
    mutates_base: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    description: ClassVar[str] = "bottom-r singular components (arXiv 2406.09044)"

    def init(self, W: Tensor, rank: int, scale: float, ctx: InitContext) -> Factors:
        U, S, Vh, route = exact_svd_slice(W, rank, "bottom")  # (m, r), (r,), (r, n)
        A, B = factorize(U, S, Vh, scale)
        info = {"svd": f"exact-{route}", "sigma_kept": [float(S[0]), float(S[-1])]}
        return Factors(A.float(), B.float(), info)


register_initializer(MiLoRA())
