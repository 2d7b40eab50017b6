"""A matrix whose stored bytes need decoding: which stored tensors make it, its logical shape,
and the pure function that turns them into floats.

Quantized safetensors checkpoints (fp8 with scales, compressed-tensors, GPTQ, AWQ,
bitsandbytes, MXFP4) and GGUF files store one logical weight matrix as several tensors (codes
plus scales, zeros, group indices...) or as a blob of blocks. An `Encoded` names those tensors
(`parts`, each an ordinary `TensorRef` read by the one reader) and the `Codec` that decodes
them; `spectra.sources.roles.MatrixRef.encoded` carries it, and every analysis sees the decoded
float matrix. The design note shared with the GGUF source is /work/wt/CODEC.md (round 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from spectra.errors import SourceError
from spectra.formats.safetensors import TensorRef, clip

if TYPE_CHECKING:  # torch is imported by the decoders only: reading headers (`spectra inspect`)
    import torch  # never imports it


@dataclass(frozen=True)
class Storage:
    """How one logical matrix is stored, as `inspect` and `report` show it.

    scheme: the format, e.g. "fp8-block", "gptq", "awq", "bnb-nf4", "mxfp4", "gguf:Q4_K".
    bits: bits per stored weight value (not counting scales).
    block: what one scale covers, e.g. "128x128", "group 128", "channel", "tensor", "32".
    """

    scheme: str
    bits: float
    block: str

    def label(self) -> str:
        """One short string for tables: `gptq int4 group 128`."""
        bits = f"{self.bits:g}"
        return f"{self.scheme} {bits}-bit {self.block}".strip()


class Codec(Protocol):
    """Decodes the raw parts of one `Encoded` matrix; implementations are frozen dataclasses."""

    @property
    def storage(self) -> Storage:
        """What the matrix is stored as."""
        ...

    def decode(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The logical matrix as float32 from the raw stored `parts` (the `Encoded.parts`, same
        order, each in its stored dtype and shape). Pure; a part of the wrong shape or dtype is
        a `SourceError` naming it."""
        ...

    def key(self) -> str:
        """The codec and every parameter that changes the decoded values (for cache keys)."""
        ...


@dataclass(frozen=True)
class Encoded:
    """A logical matrix stored as `parts` (parts[0] is the primary: weight / qweight / blocks)
    that `codec` decodes into a float tensor of `shape` (2-D, or 3-D for an expert stack)."""

    parts: tuple[TensorRef, ...]
    shape: tuple[int, ...]
    codec: Codec

    @property
    def nbytes(self) -> int:
        """Stored bytes of all parts."""
        return sum(p.nbytes for p in self.parts)

    @property
    def primary(self) -> TensorRef:
        return self.parts[0]

    def expert(self, index: int) -> Encoded:
        """Expert `index` of a 3-D stack: every part sliced on its first dimension."""
        return Encoded(tuple(slice_first(p, index) for p in self.parts), self.shape[1:], self.codec)


def slice_first(ref: TensorRef, index: int) -> TensorRef:
    """The `TensorRef` of `ref[index]` (a contiguous byte range of a tensor of >= 1 dims)."""
    count = ref.shape[0]
    if not 0 <= index < count:
        raise SourceError(f"{ref.shard}: tensor {clip(ref.name)} has no index {index}")
    each = ref.nbytes // count
    return TensorRef(
        f"{ref.name}[{index}]", ref.shape[1:], ref.dtype, ref.shard, ref.offset + index * each, each
    )


def decode(encoded: Encoded, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """`encoded.codec.decode(parts)`, checked to give float32 of `encoded.shape`."""
    import torch

    out = encoded.codec.decode(parts)
    if tuple(out.shape) != tuple(encoded.shape) or out.dtype != torch.float32:
        raise SourceError(
            f"{encoded.primary.shard}: tensor {clip(encoded.primary.name)}: "
            f"{encoded.codec.storage.scheme} decoded to {out.dtype} {tuple(out.shape)}, "
            f"expected float32 {tuple(encoded.shape)}"
        )
    return out


def part_error(ref_name: str, scheme: str, why: str) -> SourceError:
    """The one message for a part that does not fit its scheme."""
    return SourceError(f"{scheme}: tensor {clip(ref_name)}: {why}")
