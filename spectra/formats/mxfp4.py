"""MXFP4 (OCP microscaling, gpt-oss): `quant_method: "mxfp4"`.

Stored per weight `X`: `X_blocks` uint8 (..., rows, G, 16): 32 fp4 (e2m1) values per block of 16
bytes, the first value in the low nibble; `X_scales` uint8 (..., rows, G): one e8m0 exponent per
block (2^(s - 127)). W[..., r, 32 g + k] = E2M1[code] * 2^(scales[..., r, g] - 127), giving
(..., rows, 32 G): (E, out, in) for gpt-oss's expert stacks, which transformers'
`convert_moe_packed_tensors` then transposes into its parameter layout (E, in, out); a codec with
`transpose` does the same, so a stack decodes exactly as the dequantized checkpoint stores it.
E2M1 magnitudes: 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 is the sign.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from spectra.formats.codec import Storage, part_error
from spectra.formats.packing import expect

if TYPE_CHECKING:  # torch is imported by the decoders only: reading headers (`spectra inspect`)
    import torch  # never imports it

SCHEME = "mxfp4"
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK_BYTES = 16


@dataclass(frozen=True)
class Mxfp4Codec:
    """Decodes `(blocks, scales)` of `name` into float32 (..., rows, 32 G), or with
    `transpose` (..., 32 G, rows) as transformers loads gpt-oss's expert stacks."""

    name: str
    transpose: bool = False

    @property
    def storage(self) -> Storage:
        return Storage(SCHEME, 4, "32")

    def key(self) -> str:
        return f"{SCHEME}:e2m1:e8m0:32:{'T' if self.transpose else ''}"

    def decode(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Any leading dimensions (a whole stack, or one expert's slice of it)."""
        import torch

        blocks, scales = parts
        if blocks.dim() < 2 or blocks.shape[-1] != BLOCK_BYTES:
            raise part_error(
                f"{self.name}_blocks",
                SCHEME,
                f"shape {tuple(blocks.shape)}, expected (..., groups, {BLOCK_BYTES})",
            )
        *lead, groups, _ = blocks.shape
        expect(f"{self.name}_blocks", SCHEME, blocks, blocks.shape, (torch.uint8,))
        expect(f"{self.name}_scales", SCHEME, scales, (*lead, groups), (torch.uint8,))
        lut = torch.tensor(E2M1, dtype=torch.float32)
        codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).to(torch.int64)
        values = lut[codes].reshape(*lead, groups, 32)
        exponent = scales.to(torch.float32).sub_(127).unsqueeze(-1)
        out = torch.ldexp(values, exponent).reshape(*lead, groups * 32)
        return out.transpose(-1, -2).contiguous() if self.transpose else out
