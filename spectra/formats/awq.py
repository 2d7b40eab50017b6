"""AWQ checkpoints (AutoAWQ, llm-awq), GEMM layout: `quant_method: "awq"`, `version: "gemm"`.

Stored per Linear `X`: `X.qweight` int32 (in, out * bits / 32), `X.qzeros` int32
(groups, out * bits / 32), `X.scales` float16 (groups, out). Codes are packed along the output
dimension, least significant first, in AutoAWQ's interleaved order: nibble k of a word holds
output column 8 * word + ORDER[k], ORDER = (0, 2, 4, 6, 1, 3, 5, 7) (its `pack` / `AWQ_ORDER`).
No +1 on the zeros. W^T[j, o] = scales[j // g, o] * (q[j, o] - z[j // g, o]).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spectra.formats.codec import Storage
from spectra.formats.packing import INT32, expect, float_part, unpack_int32

if TYPE_CHECKING:  # torch is imported by the decoders only: reading headers (`spectra inspect`)
    import torch  # never imports it

SCHEME = "awq"
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
CHUNK_ROWS = 1024  # input rows decoded at a time


def deinterleave(values: torch.Tensor) -> torch.Tensor:
    """Columns unpacked in word order (nibble k of word w at 8w + k) to AWQ's logical order."""
    import torch

    rows, cols = values.shape
    out = torch.empty_like(values)
    order = torch.tensor(ORDER, dtype=torch.int64)
    out.view(rows, cols // 8, 8)[:, :, order] = values.view(rows, cols // 8, 8)
    return out


@dataclass(frozen=True)
class AwqCodec:
    """Decodes `(qweight, qzeros, scales)` of the matrix `name` (logical `X.weight`, (out, in))."""

    name: str
    shape: tuple[int, int]
    group_size: int
    bits: int = 4

    @property
    def storage(self) -> Storage:
        group = "channel" if self.group_size <= 0 else f"group {self.group_size}"
        return Storage(SCHEME, self.bits, group)

    def key(self) -> str:
        return f"{SCHEME}:gemm:{self.bits}:{self.group_size}"

    def decode(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        import torch

        qweight, qzeros, scales = parts
        out, cols = self.shape
        stem = self.name.removesuffix("weight")
        size = cols if self.group_size <= 0 else self.group_size
        groups = -(-cols // size)
        expect(stem + "qweight", SCHEME, qweight, (cols, out // 8), INT32)
        expect(stem + "qzeros", SCHEME, qzeros, (groups, out // 8), INT32)
        scale = float_part(stem + "scales", SCHEME, scales, (groups, out))
        zeros = deinterleave(unpack_int32(qzeros, 4, 1))
        wt = torch.empty(cols, out, dtype=torch.float32)  # W^T, filled a slab at a time
        for j0 in range(0, cols, CHUNK_ROWS):  # bounded temporaries
            j1 = min(j0 + CHUNK_ROWS, cols)
            q = deinterleave(unpack_int32(qweight[j0:j1], 4, 1))
            g = torch.arange(j0, j1) // size
            torch.mul((q - zeros[g]).to(torch.float32), scale[g], out=wt[j0:j1])
        return wt.T.contiguous()
