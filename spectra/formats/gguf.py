"""The GGUF format (llama.cpp): the one header reader and validator, and one tensor's values.

A GGUF file (version 2 or 3, little-endian) is ``"GGUF" | u32 version | u64 tensor_count |
u64 kv_count | kv_count metadata entries | tensor_count tensor infos | padding | data``. A
metadata entry is ``string key | u32 value type | value`` (strings are ``u64 length | UTF-8
bytes``; arrays are ``u32 item type | u64 count | items``); a tensor info is ``string name |
u32 n_dims | n_dims x u64 ne | u32 ggml type | u64 offset``. ``ne`` lists the dimensions fastest
first, so a torch shape is ``ne`` reversed (a 2-D weight ``ne = [in, out]`` is ``(out, in)``).
The data section starts at the next multiple of ``general.alignment`` (default 32) after the
infos, and every tensor's offset (relative to it) is a multiple of that alignment. See the
specification in ggml's repository, ``docs/gguf.md``.

`read_gguf(path)` parses and validates everything but the data (each entry within the file,
counts and lengths bounded by what is left of it, types known, each tensor's bytes inside the
data section and disjoint from the others, names unique), reading only the header through
`open_input`. A tensor's bytes are read like any other stored tensor (one byte range, by
`spectra.sources.reader`); `GgufCodec` (a `spectra.formats.codec.Codec`) decodes them in bounded
chunks of blocks (`spectra.formats.gguf_blocks`; types not decoded there go through the `gguf`
package's own dequantizer), so memory is the stored bytes, the float32 result and one chunk.

The GGML type table (names, block sizes, bytes per block) is the `gguf` package's: reading a
GGUF file needs it (``pip install 'spectra[gguf]'``).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from spectra.device import require_host_memory
from spectra.errors import SourceError
from spectra.formats.codec import Storage
from spectra.formats.files import open_input, show_path

if TYPE_CHECKING:  # torch (and the block decoders) are imported by the decoding functions:
    from torch import Tensor  # reading a header (`spectra inspect`) never imports them

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
#: Arrays longer than this are parsed (to find what follows) but not kept: the token lists and
#: merges of a tokenizer, which no analysis reads.
MAX_KEPT_ARRAY = 1024
#: Longest metadata string or name accepted (a chat template is a few KB).
MAX_STRING = 64 << 20
#: Bytes of stored blocks decoded at once.
CHUNK_BYTES = 4 << 20
GGUF_HINT = "pip install 'spectra[gguf]'"

#: Unquantized GGML types: read as stored, with the name of the torch dtype that views their
#: bytes (names: this module imports torch only in the functions that decode).
PLAIN: dict[str, str] = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
}

# GGUF metadata value types: (name, struct format) for scalars; 8 is STRING, 9 is ARRAY.
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("UINT8", "<B"),
    1: ("INT8", "<b"),
    2: ("UINT16", "<H"),
    3: ("INT16", "<h"),
    4: ("UINT32", "<I"),
    5: ("INT32", "<i"),
    6: ("FLOAT32", "<f"),
    7: ("BOOL", "<?"),
    10: ("UINT64", "<Q"),
    11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}
_STRING, _ARRAY = 8, 9


def gguf_types() -> dict[int, tuple[str, int, int]]:
    """`{type id: (name, block size, bytes per block)}` from the `gguf` package (a one-line
    `SourceError` naming the extra when it is not installed)."""
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        raise SourceError(f"reading GGUF files needs the gguf package: {GGUF_HINT}") from None
    return {t.value: (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType}


@dataclass(frozen=True)
class LongArray:
    """A metadata array too long to keep (`MAX_KEPT_ARRAY`): its item type and length."""

    item_type: str
    length: int


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: name, dimensions (`ne`, fastest first), GGML type and bytes.

    `offset` is absolute (data section start + the tensor's relative offset); `nbytes` is
    `numel / block_size * type_size`.
    """

    name: str
    ne: tuple[int, ...]
    type_name: str
    block_size: int
    type_size: int
    offset: int
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The torch shape: `ne` reversed."""
        return tuple(reversed(self.ne))

    @property
    def numel(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n

    @property
    def quantized(self) -> bool:
        return self.type_name not in PLAIN


@dataclass(frozen=True)
class GGUFFile:
    """The parsed header of a GGUF file: metadata (scalars, strings, short arrays as tuples,
    long arrays as `LongArray`) and tensors in file order."""

    path: Path
    size: int
    version: int
    alignment: int
    data_start: int
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensor, ...]

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None


class _Cursor:
    """Sequential reads of a header, each checked against the file size (one-line errors)."""

    def __init__(self, fh: BinaryIO, size: int, where: str) -> None:
        self.fh, self.size, self.where, self.pos = fh, size, where, 0

    def fail(self, why: str) -> SourceError:
        return SourceError(f"{self.where}: {why} (at byte {self.pos}): not a valid GGUF file")

    def read(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise SourceError(
                f"{self.where}: truncated file ({what} needs {n} bytes at byte {self.pos}, the "
                f"file has {self.size}): download or copy it again"
            )
        data = self.fh.read(n)
        if len(data) != n:
            raise SourceError(f"{self.where}: truncated file while reading {what}")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            self.read(n, what)  # raises the truncation message
        self.pos += n
        self.fh.seek(self.pos)

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))[0]

    def u32(self, what: str) -> int:
        return int(self.unpack("<I", what))

    def u64(self, what: str) -> int:
        return int(self.unpack("<Q", what))

    def string(self, what: str) -> str:
        n = self.u64(f"{what} length")
        if n > MAX_STRING:
            raise self.fail(f"{what} claims {n} bytes, more than the {MAX_STRING} allowed")
        raw = self.read(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not UTF-8 ({exc.reason})") from None

    def count(self, what: str, min_bytes: int) -> int:
        """A u64 count of items of at least `min_bytes` each: bounded by what is left."""
        n = self.u64(what)
        if n * min_bytes > self.size - self.pos:
            raise SourceError(
                f"{self.where}: {what} is {n}, more than the {self.size - self.pos} bytes left "
                "can hold: the file is truncated or not GGUF"
            )
        return n


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse and validate the header of the GGUF file `path` (reads the header only)."""
    types = gguf_types()
    where = show_path(path)
    with open_input(path, "GGUF file") as fh:
        size = os.fstat(fh.fileno()).st_size
        cur = _Cursor(fh, size, where)
        try:
            version, n_tensors, n_kv = _preamble(cur)
            metadata = {}
            for _ in range(n_kv):
                key = cur.string("metadata key")
                if key in metadata:
                    raise cur.fail(f"metadata key {key[:80]!r} appears twice")
                metadata[key] = _value(cur, cur.u32(f"type of {key[:80]!r}"), key, depth=0)
            infos = [_tensor_info(cur, types) for _ in range(n_tensors)]
        except OSError as exc:
            raise SourceError(f"{where}: cannot read GGUF header ({exc.strerror or exc})") from None
    alignment = _alignment(metadata, where)
    data_start = -(-cur.pos // alignment) * alignment
    tensors = tuple(_place(info, data_start, alignment, where) for info in infos)
    _check_layout(tensors, size, where)
    return GGUFFile(Path(path), size, version, alignment, data_start, metadata, tensors)


def _preamble(cur: _Cursor) -> tuple[int, int, int]:
    if cur.fh.read(4) != MAGIC:
        raise cur.fail("no GGUF magic")
    cur.pos = 4
    version = cur.u32("version")
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in VERSIONS:
            raise SourceError(f"{cur.where}: big-endian GGUF files are not supported")
        raise SourceError(
            f"{cur.where}: GGUF version {version} is not supported (only 2 and 3): convert the "
            "model again with a current llama.cpp"
        )
    n_tensors = cur.count("tensor count", 8 + 4 + 8 + 4 + 8)
    n_kv = cur.count("metadata count", 8 + 4)
    return version, n_tensors, n_kv


def _value(cur: _Cursor, vtype: int, key: str, *, depth: int) -> Any:
    if vtype in _SCALARS:
        return cur.unpack(_SCALARS[vtype][1], f"value of {key[:80]!r}")
    if vtype == _STRING:
        return cur.string(f"value of {key[:80]!r}")
    if vtype != _ARRAY or depth > 1:
        raise cur.fail(f"metadata {key[:80]!r} has unknown value type {vtype}")
    item = cur.u32(f"item type of {key[:80]!r}")
    if item in _SCALARS:
        fmt = _SCALARS[item][1]
        n = cur.count(f"length of {key[:80]!r}", struct.calcsize(fmt))
        if n > MAX_KEPT_ARRAY:
            cur.skip(n * struct.calcsize(fmt), f"array {key[:80]!r}")
            return LongArray(_SCALARS[item][0], n)
        raw = cur.read(n * struct.calcsize(fmt), f"array {key[:80]!r}")
        return tuple(struct.unpack(f"<{n}{fmt[1]}", raw))
    n = cur.count(f"length of {key[:80]!r}", 8 if item == _STRING else 12)
    values = [_value(cur, item, key, depth=depth + 1) for _ in range(n)]
    if n > MAX_KEPT_ARRAY:
        name = "STRING" if item == _STRING else "ARRAY"
        return LongArray(name, n)
    return tuple(values)


def _tensor_info(cur: _Cursor, types: dict[int, tuple[str, int, int]]) -> GGUFTensor:
    name = cur.string("tensor name")
    what = f"tensor {name[:80]!r}"
    n_dims = cur.u32(f"{what} dimension count")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"{what} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    ne = tuple(cur.u64(f"{what} dimensions") for _ in range(n_dims))
    type_id = cur.u32(f"{what} type")
    rel = cur.u64(f"{what} offset")
    if type_id not in types:
        raise cur.fail(f"{what} has unknown GGML type {type_id} (a newer or removed type)")
    type_name, block, type_size = types[type_id]
    if any(d < 1 for d in ne):
        raise cur.fail(f"{what} has an empty dimension {list(ne)}")
    numel = 1
    for d in ne:
        numel *= d
    if numel >= 1 << 62:
        raise cur.fail(f"{what} claims {numel} elements")
    if ne[0] % block:
        raise cur.fail(
            f"{what}: rows of {ne[0]} values do not split into {type_name} blocks of {block}"
        )
    return GGUFTensor(name, ne, type_name, block, type_size, rel, numel // block * type_size)


def _alignment(metadata: dict[str, Any], where: str) -> int:
    value = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < 1
        or value > 1 << 20
        or value & (value - 1)
    ):
        raise SourceError(
            f"{where}: general.alignment {str(value)[:40]} is not a power of two up to 2**20: "
            "not a valid GGUF file"
        )
    return value


def _place(info: GGUFTensor, data_start: int, alignment: int, where: str) -> GGUFTensor:
    if info.offset % alignment:
        raise SourceError(
            f"{where}: tensor {info.name[:80]!r} offset {info.offset} is not a multiple of the "
            f"alignment {alignment}: not a valid GGUF file"
        )
    return GGUFTensor(
        info.name,
        info.ne,
        info.type_name,
        info.block_size,
        info.type_size,
        data_start + info.offset,
        info.nbytes,
    )


def _check_layout(tensors: tuple[GGUFTensor, ...], size: int, where: str) -> None:
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise SourceError(f"{where}: tensor {t.name[:80]!r} appears twice: not a valid GGUF")
        seen.add(t.name)
        if t.offset + t.nbytes > size:
            raise SourceError(
                f"{where}: tensor {t.name[:80]!r} ends at byte {t.offset + t.nbytes}, past the "
                f"end of the file ({size} bytes): the file is truncated, download it again"
            )
    ordered = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.offset + a.nbytes > b.offset:
            raise SourceError(
                f"{where}: tensors {a.name[:80]!r} and {b.name[:80]!r} overlap: not a valid GGUF"
            )


def dequantize(raw: Tensor, tensor: GGUFTensor, *, chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """float32 values of shape `tensor.shape` from `raw`, the tensor's stored bytes (uint8).

    Quantized blocks are decoded `chunk_bytes` at a time into the result, so the working memory
    is the result plus one chunk's intermediates.
    """
    return decode_rows(raw, tensor.type_name, tensor.block_size, tensor.type_size, chunk_bytes)


def decode_rows(
    raw: Tensor, type_name: str, block_size: int, type_size: int, chunk_bytes: int = CHUNK_BYTES
) -> Tensor:
    """`raw`: uint8 of shape `(*rows, row_bytes)` (whole blocks of GGML type `type_name`) ->
    float32 of shape `(*rows, row_bytes / type_size * block_size)`."""
    import torch

    *rows, row_bytes = raw.shape
    shape = (*rows, row_bytes // type_size * block_size)
    flat = raw.reshape(-1)
    n_blocks = flat.numel() // type_size
    if type_name in PLAIN:
        stored = flat.view(getattr(torch, PLAIN[type_name]))
        return stored.to(torch.float32).reshape(shape)
    require_host_memory(n_blocks * block_size * 4, "a GGUF tensor", "it cannot be decoded here")
    out = torch.empty(n_blocks * block_size, dtype=torch.float32)
    per_chunk = max(1, chunk_bytes // type_size)
    for start in range(0, n_blocks, per_chunk):
        k = min(per_chunk, n_blocks - start)
        blocks = flat[start * type_size : (start + k) * type_size].view(k, type_size)
        values = _decode(type_name, blocks)
        out[start * block_size : (start + k) * block_size] = values.reshape(-1)
    return out.reshape(shape)


def unpermute_rows(w: Tensor, heads: int) -> Tensor:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py, `LlamaModel.permute`).

    The converter regroups each head's rows from the Hugging Face rotary layout (first half of
    the head's rotary pairs, then the second half) into interleaved pairs: rows viewed as
    `(heads, 2, head_dim / 2)` are transposed to `(heads, head_dim / 2, 2)`. This is the inverse:
    `(heads, head_dim / 2, 2)` back to `(heads, 2, head_dim / 2)`. `heads` is the attention head
    count for q and the key/value head count for k (grouped-query attention).
    """
    rows = w.shape[0]
    if heads < 1 or rows % (2 * heads):
        raise SourceError(
            f"cannot undo the q/k row permutation: {rows} rows do not split into {heads} heads "
            "of an even size (the GGUF metadata's head counts do not fit this tensor)"
        )
    tail = w.shape[1:]
    return w.reshape(heads, rows // heads // 2, 2, *tail).transpose(1, 2).reshape(rows, *tail)


@dataclass(frozen=True)
class GgufCodec:
    """Decodes one GGUF tensor stored as a uint8 part of shape `(*rows, row_bytes)` (see
    `spectra.formats.codec`): blocks to float32, then llama.cpp's q/k row permutation undone
    when `heads` is set (each 2-D matrix of a stack separately)."""

    type_name: str
    block_size: int
    type_size: int
    heads: int | None = None

    @property
    def storage(self) -> Storage:
        bits = self.type_size * 8 / self.block_size
        return Storage(f"gguf:{self.type_name}", bits, f"block {self.block_size}")

    def key(self) -> str:
        return f"gguf:{self.type_name}:heads={self.heads if self.heads is not None else '-'}"

    def decode(self, parts: Sequence[Tensor]) -> Tensor:
        import torch

        if len(parts) != 1:
            raise SourceError(f"a GGUF tensor is one part, got {len(parts)}")
        raw = parts[0]
        if raw.dtype != torch.uint8 or raw.dim() < 2 or raw.shape[-1] % self.type_size:
            raise SourceError(
                f"a GGUF {self.type_name} part must be uint8 rows of whole "
                f"{self.type_size}-byte blocks, got {raw.dtype} {tuple(raw.shape)}"
            )
        values = decode_rows(raw, self.type_name, self.block_size, self.type_size)
        if self.heads is None:
            return values
        if values.dim() == 2:
            return unpermute_rows(values, self.heads)
        return torch.stack([unpermute_rows(m, self.heads) for m in values])


def _decode(type_name: str, blocks: Tensor) -> Tensor:
    import torch

    from spectra.formats.gguf_blocks import NATIVE, decode_blocks

    if type_name in NATIVE:
        return decode_blocks(type_name, blocks)
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        values = dequantize(blocks.numpy(), GGMLQuantizationType[type_name])
    except NotImplementedError:
        raise SourceError(
            f"GGML type {type_name} cannot be dequantized (neither spectra nor the installed "
            "gguf package decodes it): re-quantize the model to a common type such as Q8_0"
        ) from None
    return torch.from_numpy(values)
