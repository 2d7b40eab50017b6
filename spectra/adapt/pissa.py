"""PiSSA: adapt the principal (top-r) singular components, freeze the rest in the residual base.

Meng, Wang, Zhang 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of
Large Language Models", arXiv 2404.02948. ``A = diag(sqrt(S_r / s)) Vh_r``,
``B = U_r diag(sqrt(S_r / s))``, residual ``W - s B A``. The SVD is exact for small matrices and
randomized block Krylov for large ones (``svd="auto"``, see spectra.adapt.svd).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from spectra.adapt.factorize import factorize
from spectra.adapt.registry import Factors, InitContext, register_initializer
from spectra.adapt.svd import top_svd


class PiSSA:
    name: ClassVar[str] = "pissa"
    mutates_base: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    description: ClassVar[str] = "top-r singular components (arXiv 2404.02948)"

    def init(self, W: Tensor, rank: int, scale: float, ctx: InitContext) -> Factors:
        U, S, Vh, info = top_svd(W, rank, ctx)
        A, B = factorize(U, S, Vh, scale)
        info["sigma_kept"] = [float(S[0]), float(S[-1])]
        return Factors(A.float(), B.float(), info)


register_initializer(PiSSA())
