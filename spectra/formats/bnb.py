"""bitsandbytes checkpoints saved by transformers: `quant_method: "bitsandbytes"`.

4-bit (NF4 / FP4), per Linear `X`: `X.weight` uint8 (n / 2, 1): two 4-bit codes per byte, the
first value in the high nibble; `X.weight.absmax` (one scale per `blocksize` values);
`X.weight.quant_map` float32 (16,): the code's values; `X.weight.quant_state.bitsandbytes__nf4`
(or `__fp4`) uint8: JSON with `quant_type`, `blocksize`, `dtype`, `shape`, and for nested
("double") quantization `nested_blocksize`, `nested_offset`, with `X.weight.nested_absmax` and
`X.weight.nested_quant_map`: then absmax is itself 8-bit,
absmax[b] = nested_quant_map[absmax_u8[b]] * nested_absmax[b // nested_blocksize] + offset.
W.flatten()[i] = quant_map[code[i]] * absmax[i // blocksize] (bitsandbytes' `dequantize_4bit`).

8-bit (LLM.int8): `X.weight` int8 (out, in) and `X.SCB` float32 (out,): W = weight * SCB * (1/127)
(`int8_vectorwise_dequant`, in that order).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spectra.errors import SourceError
from spectra.formats.codec import Storage, part_error
from spectra.formats.packing import expect, float_part

if TYPE_CHECKING:  # torch is imported by the decoders only: reading headers (`spectra inspect`)
    import torch  # never imports it

SCHEME = "bnb"
QUANT_TYPES = ("nf4", "fp4")
CHUNK_BYTES = 1 << 22  # code bytes decoded at a time


@dataclass(frozen=True)
class QuantState:
    """The JSON quant state of one 4-bit weight."""

    quant_type: str
    blocksize: int
    shape: tuple[int, ...]
    nested_blocksize: int | None = None
    nested_offset: float = 0.0

    @classmethod
    def parse(cls, raw: bytes, where: str) -> QuantState:
        try:
            obj = json.loads(raw.decode("utf-8"))
            quant_type = str(obj["quant_type"])
            blocksize = int(obj["blocksize"])
            shape = tuple(int(d) for d in obj["shape"])
            nested = obj.get("nested_blocksize")
            nested_blocksize = None if nested is None else int(nested)
            offset = float(obj.get("nested_offset", 0.0) or 0.0)
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise SourceError(f"{where}: not a bitsandbytes quant state ({exc})") from None
        if quant_type not in QUANT_TYPES or blocksize <= 0 or any(d < 0 for d in shape):
            raise SourceError(
                f"{where}: bitsandbytes quant state with quant_type {quant_type!r}, "
                f"blocksize {blocksize}, shape {shape}: not a 4-bit weight spectra can read"
            )
        if nested_blocksize is not None and nested_blocksize <= 0:
            raise SourceError(f"{where}: nested_blocksize {nested_blocksize} must be positive")
        return cls(quant_type, blocksize, shape, nested_blocksize, offset)


@dataclass(frozen=True)
class Bnb4bitCodec:
    """Decodes `(weight, absmax, quant_map[, nested_absmax, nested_quant_map], quant_state)`
    of `name` (the state, already parsed into `state`, is a part so cache keys cover it)."""

    name: str
    state: QuantState

    @property
    def storage(self) -> Storage:
        nested = " nested" if self.state.nested_blocksize else ""
        return Storage(f"{SCHEME}-{self.state.quant_type}{nested}", 4, str(self.state.blocksize))

    def key(self) -> str:
        return f"{SCHEME}:{self.state}"

    def decode(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        import torch

        weight, absmax, quant_map, *nested = parts[:-1]  # the last part is the JSON state
        s = self.state
        n = math.prod(s.shape)
        blocks = -(-n // s.blocksize)
        if weight.dtype != torch.uint8 or weight.numel() != -(-n // 2):
            raise part_error(
                self.name,
                SCHEME,
                f"{weight.dtype} {tuple(weight.shape)}, expected "
                f"{-(-n // 2)} uint8 bytes for shape {s.shape}",
            )
        code = float_part(f"{self.name}.quant_map", SCHEME, quant_map, (16,))
        scales = self._absmax(absmax, nested, blocks)
        flat = weight.reshape(-1)
        out = torch.empty(n, dtype=torch.float32)
        step = CHUNK_BYTES
        for b0 in range(0, flat.numel(), step):  # bounded temporaries (int64 codes)
            part = flat[b0 : b0 + step]
            codes = torch.stack((part >> 4, part & 0xF), dim=1).reshape(-1).to(torch.int64)
            i0, i1 = 2 * b0, min(2 * b0 + codes.numel(), n)
            index = torch.arange(i0, i1) // s.blocksize
            out[i0:i1] = code[codes[: i1 - i0]].mul_(scales[index])
        return out.reshape(s.shape)

    def _absmax(
        self, absmax: torch.Tensor, nested: Sequence[torch.Tensor], blocks: int
    ) -> torch.Tensor:
        import torch

        s = self.state
        if s.nested_blocksize is None:
            return float_part(f"{self.name}.absmax", SCHEME, absmax, (blocks,))
        nested_absmax, nested_map = nested
        expect(f"{self.name}.absmax", SCHEME, absmax.reshape(-1), (blocks,), (torch.uint8,))
        outer = -(-blocks // s.nested_blocksize)
        scale2 = float_part(f"{self.name}.nested_absmax", SCHEME, nested_absmax, (outer,))
        code2 = float_part(f"{self.name}.nested_quant_map", SCHEME, nested_map, (256,))
        index = torch.arange(blocks) // s.nested_blocksize
        return code2[absmax.reshape(-1).to(torch.int64)].mul_(scale2[index]).add_(s.nested_offset)


@dataclass(frozen=True)
class Bnb8bitCodec:
    """Decodes `(weight int8, SCB)` of `name`: row-wise absmax int8 (LLM.int8)."""

    name: str
    shape: tuple[int, int]

    @property
    def storage(self) -> Storage:
        return Storage(f"{SCHEME}-int8", 8, "channel")

    def key(self) -> str:
        return f"{SCHEME}:int8"

    def decode(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        import torch

        weight, scb = parts
        expect(self.name, SCHEME, weight, self.shape, (torch.int8,))
        stem = self.name.removesuffix("weight")
        scale = float_part(stem + "SCB", SCHEME, scb, (self.shape[0], 1))
        return weight.to(torch.float32).mul_(scale).mul_(1.0 / 127.0)
