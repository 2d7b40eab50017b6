"""compressed-tensors checkpoints (llm-compressor, vLLM): `quant_method: "compressed-tensors"`.

Formats read here (the config's `format`, per group or global):
- `float-quantized`: `X.weight` fp8 + `X.weight_scale`;
- `int-quantized` / `naive-quantized`: `X.weight` int8 + `X.weight_scale` (+ `X.weight_zero_point`);
- `pack-quantized`: `X.weight_packed` int32 (values of `num_bits` packed along the input
  dimension, least significant first, stored with an offset of 2^(bits-1)), `X.weight_shape`
  (the logical (out, in)), `X.weight_scale` (+ `X.weight_zero_point` packed along the output
  dimension, + `X.weight_g_idx`).
Strategies: tensor (one scale), channel ((out, 1)), group ((out, in / group_size); with a g_idx
column j uses group g_idx[j]), block ((ceil(out / b0), ceil(in / b1))). The value is
W = (q - zero_point) * scale (compressed-tensors' `dequantize`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spectra.formats.codec import Storage, part_error
from spectra.formats.packing import INT32, expect, float_part, unpack_int32

if TYPE_CHECKING:  # torch is imported by the decoders only: reading headers (`spectra inspect`)
    import torch  # never imports it

SCHEME = "compressed-tensors"
FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized")
STRATEGIES = ("tensor", "channel", "group", "block")


@dataclass(frozen=True)
class WeightArgs:
    """The weight quantization arguments of one config group (what decoding needs)."""

    format: str
    num_bits: int
    type: str  # "int" or "float"
    strategy: str
    group_size: int | None = None
    block: tuple[int, int] | None = None
    symmetric: bool = True


@dataclass(frozen=True)
class CompressedTensorsCodec:
    """Decodes the parts of the matrix `name` (logical `X.weight`): the codes (`weight` or
    `weight_packed`), `weight_scale`, then, as flagged, `weight_zero_point`, `weight_g_idx`
    and (packed) `weight_shape`."""

    name: str
    args: WeightArgs
    shape: tuple[int, int]
    zero_point: bool = False
    g_idx: bool = False

    @property
    def storage(self) -> Storage:
        a = self.args
        block = {
            "tensor": "tensor",
            "channel": "channel",
            "group": f"group {a.group_size}",
            "block": f"{a.block[0]}x{a.block[1]}" if a.block else "block",
        }[a.strategy]
        kind = f"{a.type}{a.num_bits}" + ("" if a.symmetric else " asym")
        return Storage(f"{SCHEME}:{a.format} {kind}", a.num_bits, block)

    def key(self) -> str:
        return f"{SCHEME}:{self.args}:{self.zero_point}:{self.g_idx}"

    def scale_shape(self) -> tuple[int, int]:
        rows, cols = self.shape
        a = self.args
        if a.strategy == "tensor":
            return (1, 1)
        if a.strategy == "channel":
            return (rows, 1)
        if a.strategy == "group":
            return (rows, math.ceil(cols / int(a.group_size or cols)))
        b0, b1 = a.block or (rows, cols)
        return (math.ceil(rows / b0), math.ceil(cols / b1))

    def decode(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        codes, scale_part, *rest = parts
        zero_part = rest.pop(0) if self.zero_point else None
        g_idx = rest.pop(0) if self.g_idx else None
        q = self._codes(codes, rest[0] if rest else None)
        sshape = self.scale_shape()
        scale = float_part(f"{self.name}_scale", SCHEME, scale_part, sshape)
        zero = None if zero_part is None else self._zero(zero_part, sshape)
        if zero is not None:
            q = q - self._expand(zero, g_idx)
        return q.mul_(self._expand(scale, g_idx))

    def _codes(self, codes: torch.Tensor, shape_part: torch.Tensor | None) -> torch.Tensor:
        import torch

        rows, cols = self.shape
        a = self.args
        if a.format != "pack-quantized":
            if tuple(codes.shape) != self.shape:
                raise part_error(
                    self.name, SCHEME, f"shape {tuple(codes.shape)}, expected {self.shape}"
                )
            return codes.to(torch.float32)
        name = self.name.removesuffix("weight") + "weight_packed"
        if shape_part is None or [int(v) for v in shape_part.reshape(-1).tolist()] != [rows, cols]:
            raise part_error(name, SCHEME, f"weight_shape does not say {self.shape}")
        expect(name, SCHEME, codes, (rows, math.ceil(cols * a.num_bits / 32)), INT32)
        if 32 % a.num_bits:
            raise part_error(name, SCHEME, f"{a.num_bits}-bit packing is not supported")
        values = unpack_int32(codes, a.num_bits, 1)[:, :cols]
        return (values - (1 << (a.num_bits - 1))).to(torch.float32)

    def _zero(self, zero: torch.Tensor, sshape: tuple[int, int]) -> torch.Tensor:
        import torch

        name = self.name.removesuffix("weight") + "weight_zero_point"
        a = self.args
        if a.format == "pack-quantized":
            packed = (math.ceil(sshape[0] * a.num_bits / 32), sshape[1])
            expect(name, SCHEME, zero, packed, INT32)
            values = unpack_int32(zero, a.num_bits, 0)[: sshape[0]]
            return (values - (1 << (a.num_bits - 1))).to(torch.float32)
        if zero.numel() != math.prod(sshape):
            raise part_error(name, SCHEME, f"shape {tuple(zero.shape)}, expected {sshape}")
        return zero.to(torch.float32).reshape(sshape)

    def _expand(self, per: torch.Tensor, g_idx: torch.Tensor | None) -> torch.Tensor:
        """A (scale-shaped) tensor broadcast to the (out, in) matrix."""
        import torch

        rows, cols = self.shape
        a = self.args
        if a.strategy in ("tensor", "channel"):
            return per
        if a.strategy == "group":
            if g_idx is not None:
                name = self.name.removesuffix("weight") + "weight_g_idx"
                index = g_idx.reshape(-1).to(torch.int64)
                if index.numel() != cols or (index < 0).any() or (index >= per.shape[1]).any():
                    raise part_error(name, SCHEME, f"not {cols} group indices < {per.shape[1]}")
                return per[:, index]
            size = int(a.group_size or cols)
            return per.repeat_interleave(size, dim=1)[:, :cols]
        b0, b1 = a.block or (rows, cols)
        return per.repeat_interleave(b0, dim=0)[:rows].repeat_interleave(b1, dim=1)[:, :cols]
