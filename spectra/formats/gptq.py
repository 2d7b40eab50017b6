"""GPTQ checkpoints (AutoGPTQ, GPTQModel, optimum): `quant_method: "gptq"`.

Stored per Linear `X`: `X.qweight` int32 (in * bits / 32, out): `bits`-bit codes packed along the
input dimension, least significant first; `X.qzeros` int32 (groups, out * bits / 32): zero points
packed along the output dimension; `X.scales` float16 (groups, out); `X.g_idx` int32 (in,):
the group of each input column (act-order), i // group_size when absent.
W^T[j, o] = scales[g_idx[j], o] * (q[j, o] - z[g_idx[j], o]).
`checkpoint_format: "gptq"` (v1, the default and what AutoGPTQ writes) stores z - 1, so the
zero point is (stored + 1) & (2^bits - 1) (AutoGPTQ's `QuantLinear` torch path);
`"gptq_v2"` (GPTQModel) stores z itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spectra.formats.codec import Storage, part_error
from spectra.formats.packing import INT32, expect, float_part, unpack_int32

if TYPE_CHECKING:  # torch is imported by the decoders only: reading headers (`spectra inspect`)
    import torch  # never imports it

SCHEME = "gptq"
BITS = (2, 4, 8)
CHUNK_WORDS = 128  # qweight rows decoded at a time (128 * 32 / bits input rows)


@dataclass(frozen=True)
class GptqCodec:
    """Decodes `(qweight, qzeros, scales[, g_idx])` of the matrix `name` (logical `X.weight`,
    shape (out, in))."""

    name: str
    shape: tuple[int, int]
    bits: int
    group_size: int  # -1: one group
    v1: bool = True
    g_idx: bool = False

    @property
    def storage(self) -> Storage:
        group = "channel" if self.group_size <= 0 else f"group {self.group_size}"
        return Storage(SCHEME if self.v1 else f"{SCHEME}-v2", self.bits, group)

    def key(self) -> str:
        return f"{SCHEME}:{self.bits}:{self.group_size}:{self.v1}:{self.g_idx}"

    def groups(self) -> int:
        cols = self.shape[1]
        return 1 if self.group_size <= 0 else -(-cols // self.group_size)

    def decode(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        import torch

        qweight, qzeros, scales, *rest = parts
        out, cols = self.shape
        stem = self.name.removesuffix("weight")
        per = 32 // self.bits
        groups = self.groups()
        expect(stem + "qweight", SCHEME, qweight, (-(-cols // per), out), INT32)
        expect(stem + "qzeros", SCHEME, qzeros, (groups, -(-out // per)), INT32)
        scale = float_part(stem + "scales", SCHEME, scales, (groups, out))
        zeros = unpack_int32(qzeros, self.bits, 1)[:, :out]  # (groups, out)
        if self.v1:
            zeros = (zeros + 1) & ((1 << self.bits) - 1)
        index = self._group_index(rest[0] if rest else None, cols, groups)
        wt = torch.empty(cols, out, dtype=torch.float32)  # W^T, filled a slab at a time
        step = CHUNK_WORDS
        for r0 in range(0, qweight.shape[0], step):  # bounded temporaries
            j0, j1 = r0 * per, min((r0 + step) * per, cols)
            q = unpack_int32(qweight[r0 : r0 + step], self.bits, 0)[: j1 - j0]  # (rows, out)
            g = index[j0:j1]
            torch.mul((q - zeros[g]).to(torch.float32), scale[g], out=wt[j0:j1])
        return wt.T.contiguous()

    def _group_index(self, g_idx: torch.Tensor | None, cols: int, groups: int) -> torch.Tensor:
        import torch

        if g_idx is None:
            size = cols if self.group_size <= 0 else self.group_size
            return torch.arange(cols) // size
        index = g_idx.reshape(-1).to(torch.int64)
        if index.numel() != cols or bool((index < 0).any()) or bool((index >= groups).any()):
            raise part_error(
                self.name.removesuffix("weight") + "g_idx", SCHEME, f"not {cols} groups < {groups}"
            )
        return index
