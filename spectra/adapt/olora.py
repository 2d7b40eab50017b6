"""OLoRA: orthonormal LoRA initialization from the QR decomposition of W.

Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models",
arXiv 2406.01775. ``Q, R = qr(W)``; ``B = Q[:, :r]`` (orthonormal columns), ``A = R[:r]``; no
division by the LoRA scale (as in the paper and PEFT's ``init_lora_weights="olora"``), so the
residual ``W - s B A`` carries the scale.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from spectra.adapt.registry import Factors, InitContext, register_initializer
from spectra.linalg.exact import qr_in_place


class OLoRA:
    name: ClassVar[str] = "olora"
    mutates_base: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    description: ClassVar[str] = "QR: B = Q[:, :r], A = R[:r] (arXiv 2406.01775)"

    def init(self, W: Tensor, rank: int, scale: float, ctx: InitContext) -> Factors:
        if W.shape[0] >= W.shape[1] and W.device.type == "cpu":
            Q, R = qr_in_place(W)  # same bits, one float64 m x n array instead of two
        else:
            Q, R = torch.linalg.qr(W.to(torch.float64))  # (m, M), (M, n)
        return Factors(R[:rank].float(), Q[:, :rank].float(), {"decomposition": "qr"})


register_initializer(OLoRA())
