"""fp8 weights with block scales (DeepSeek-V3/R1, Qwen3-FP8: transformers' "fine-grained fp8").

Stored: `X.weight` (F8_E4M3, (out, in)) and `X.weight_scale_inv` (float32, bfloat16 or e8m0,
(ceil(out / b0), ceil(in / b1))), with `quantization_config = {"quant_method": "fp8",
"weight_block_size": [b0, b1]}` in config.json. Despite its name the scale multiplies:
W[i, j] = fp8(weight[i, j]) * weight_scale_inv[i // b0, j // b1] (DeepSeek-V3's `weight_dequant`,
transformers' `_dequantize_fp8_weight`). Without a block size the scale is one per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spectra.formats.codec import Storage, part_error
from spectra.formats.packing import dtype_name, float_part

if TYPE_CHECKING:  # torch is imported by the decoders only: reading headers (`spectra inspect`)
    import torch  # never imports it

SCHEME = "fp8-block"
FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2")  # torch dtype names


@dataclass(frozen=True)
class Fp8BlockCodec:
    """Decodes `(weight, weight_scale_inv)` of the matrix `name` with blocks of `block`
    (rows, cols); `block=None`: one scale for the whole tensor."""

    name: str
    block: tuple[int, int] | None

    @property
    def storage(self) -> Storage:
        what = "tensor" if self.block is None else f"{self.block[0]}x{self.block[1]}"
        return Storage(SCHEME, 8, what)

    def key(self) -> str:
        return f"{SCHEME}:{self.block}"

    def scale_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of the scale tensor of a weight of `shape` (2-D)."""
        if self.block is None:
            return (1,)
        rows, cols = shape
        return (math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1]))

    def decode(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        import torch

        weight, scale_inv = parts
        if dtype_name(weight.dtype) not in FP8_DTYPES or weight.dim() != 2:
            raise part_error(
                self.name, SCHEME, f"{weight.dtype} {tuple(weight.shape)}, expected 2-D fp8"
            )
        scale = float_part(
            f"{self.name}_scale_inv", SCHEME, scale_inv, self.scale_shape(weight.shape)
        )
        out = weight.to(torch.float32)
        if self.block is None:
            return out.mul_(scale[0])
        b0, b1 = self.block
        cols = out.shape[1]
        for i in range(scale.shape[0]):  # one row of blocks at a time: no full-size scale copy
            rows = out[i * b0 : (i + 1) * b0]
            rows.mul_(scale[i].repeat_interleave(b1)[:cols])
        return out
