"""Sub-byte integers packed into int32 words, and the checks every decoder makes of its parts.

`unpack_int32(words, bits, dim)`: value k of a word sits at bits [k*bits, (k+1)*bits) (the least
significant first), as GPTQ, AWQ (before its column interleave) and compressed-tensors pack them;
the unpacked values replace `dim` by `dim * (32 // bits)` values, unsigned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from spectra.formats.codec import part_error

if TYPE_CHECKING:  # torch is imported by the decoders only: reading headers (`spectra inspect`)
    import torch  # never imports it


def unpack_int32(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The unsigned `bits`-bit values packed in the int32 `words` along `dim` (2-D), as int32.

    >>> unpack_int32(torch.tensor([[0x21]], dtype=torch.int32), 4, 1)[0, :3].tolist()
    [1, 2, 0]
    """
    import torch

    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    mask = (1 << bits) - 1
    if dim == 0:
        values = (words.unsqueeze(1) >> shifts.view(1, per, 1)) & mask  # (rows, per, cols)
        return values.reshape(words.shape[0] * per, words.shape[1])
    values = (words.unsqueeze(2) >> shifts.view(1, 1, per)) & mask  # (rows, cols, per)
    return values.reshape(words.shape[0], words.shape[1] * per)


def dtype_name(dtype: torch.dtype | str) -> str:
    """`torch.int32` or `"int32"` -> `"int32"`."""
    return str(dtype).removeprefix("torch.")


def expect(
    name: str,
    scheme: str,
    part: torch.Tensor,
    shape: Sequence[int],
    dtypes: Sequence[torch.dtype | str],
) -> None:
    """SourceError unless `part` (the tensor `name`) has `shape` and one of `dtypes` (torch
    dtypes or their names)."""
    if tuple(part.shape) != tuple(shape):
        raise part_error(name, scheme, f"shape {tuple(part.shape)}, expected {tuple(shape)}")
    names = [dtype_name(d) for d in dtypes]
    if dtype_name(part.dtype) not in names:
        raise part_error(name, scheme, f"dtype {part.dtype}, expected {', '.join(names)}")


def float_part(name: str, scheme: str, part: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A scale-like part as float32 of `shape`, checked to be floating point with as many
    values (a per-channel scale stored (out, 1) or (out,) reads as either)."""
    import torch

    if not part.dtype.is_floating_point:
        raise part_error(name, scheme, f"dtype {part.dtype}, expected a float dtype")
    if part.numel() != math.prod(shape):
        raise part_error(name, scheme, f"shape {tuple(part.shape)}, expected {tuple(shape)}")
    return part.to(torch.float32).reshape(tuple(shape))


INT32 = ("int32",)  # by name: this module imports torch only in the functions that decode
