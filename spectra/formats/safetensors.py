"""The safetensors format: the one header reader, the one dtype table, the one header writer.

A safetensors file is `u64 little-endian N | N bytes of UTF-8 JSON | data`. The JSON maps tensor
names to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the data start)
plus an optional `"__metadata__": {str: str}`.

Headers are parsed and validated by hand, so listing never touches tensor data: every check below
turns a malformed file into a `SourceError` that names the file and, where there is one, the
tensor. `header_bytes` writes a header back (the residual writer streams tensors after it).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from spectra.errors import SourceError
from spectra.formats.files import open_input, show_path

if TYPE_CHECKING:
    import torch

#: The index of a sharded checkpoint (`weight_map`: tensor name -> shard file name).
INDEX_NAME = "model.safetensors.index.json"
#: Largest header we accept. The reference implementation refuses 100 MB as well; a real header of
#: a 400B-parameter checkpoint is a few MB.
MAX_HEADER_BYTES = 100_000_000
#: Largest element count (and stride) a tensor may have: torch indexes with int64.
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class DType:
    """A safetensors dtype: its byte size and the name of the torch dtype that views its bytes
    (torch is imported only when that dtype is asked for: reading headers, and a report
    rendered from cached results, need no torch)."""

    name: str
    itemsize: int
    torch_name: str

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype, None when this torch build has none (known to the format, not
        readable as numbers here)."""
        import torch

        return getattr(torch, self.torch_name, None)

    @property
    def is_float(self) -> bool:
        """A floating-point type of the format (F16, BF16, F32, F64, the F8 types), by name: a
        headers-only listing (`spectra inspect`) imports no torch. A torch build without one of
        them refuses it when it is read (`spectra.sources.reader.read_range`)."""
        return self.name.startswith(("F", "BF"))


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("BOOL", 1, "bool"),
        DType("U8", 1, "uint8"),
        DType("I8", 1, "int8"),
        DType("U16", 2, "uint16"),
        DType("I16", 2, "int16"),
        DType("U32", 4, "uint32"),
        DType("I32", 4, "int32"),
        DType("U64", 8, "uint64"),
        DType("I64", 8, "int64"),
        DType("F16", 2, "float16"),
        DType("BF16", 2, "bfloat16"),
        DType("F32", 4, "float32"),
        DType("F64", 8, "float64"),
        DType("F8_E4M3", 1, "float8_e4m3fn"),
        DType("F8_E5M2", 1, "float8_e5m2"),
        DType("F8_E8M0", 1, "float8_e8m0fnu"),
        DType("C64", 8, "complex64"),
    )
}


def dtype_name_of(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (the reverse of `DType.torch_dtype`); ValueError
    for a dtype safetensors cannot store.

    >>> import torch
    >>> dtype_name_of(torch.bfloat16)
    'BF16'
    """
    for name, d in DTYPES.items():
        if d.torch_name == str(dtype).removeprefix("torch."):
            return name
    raise ValueError(f"safetensors has no dtype for {dtype}")


def torch_dtypes_by_name(names: Sequence[str]) -> dict[str, torch.dtype]:
    """`{torch name: torch dtype}` for the safetensors dtypes `names`, in that order.

    >>> list(torch_dtypes_by_name(["F32", "BF16"]))
    ['float32', 'bfloat16']
    """
    out: dict[str, torch.dtype] = {}
    for name in names:
        found = DTYPES[name].torch_dtype
        if found is None:
            raise ValueError(f"safetensors dtype {name} has no torch dtype in this torch build")
        out[str(found).removeprefix("torch.")] = found
    return out


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes are: enough to read it later without parsing anything again.

    `offset` is the absolute byte offset of the data in `shard` (header included), `nbytes` its
    length; `dtype` is the safetensors dtype string ("BF16", "F32", "F8_E4M3", ...).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    shard: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ShardHeader:
    """The parsed header of one safetensors file: its tensors (file order) and metadata."""

    path: Path
    size: int
    data_start: int
    tensors: tuple[TensorRef, ...]
    metadata: dict[str, str] = field(default_factory=dict)

    def in_data_order(self) -> list[TensorRef]:
        """The tensors sorted by where their bytes start (file order for ties)."""
        return sorted(self.tensors, key=lambda ref: ref.offset)


def read_header(path: Path) -> ShardHeader:
    """Parse and validate the header of the local safetensors file `path` (reads only the header).

    >>> # read_header(Path("model.safetensors")).tensors[0].name
    """
    with open_input(path, "safetensors file") as fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            return parse_header(fh, size, path)
        except OSError as exc:
            raise SourceError(
                f"{show_path(path)}: cannot read safetensors header ({exc.strerror or exc})"
            ) from exc


def parse_header(fh: BinaryIO, size: int, path: Path, *, label: str | None = None) -> ShardHeader:
    """Parse the header from an open binary stream positioned at 0 of a file of `size` bytes.

    `label` is how the file is named in messages (defaults to `path`); `path` goes into the refs.
    Works on any object with `read`, e.g. a remote file opened with ranged reads.
    """
    where = label or str(path)
    if size < 8:
        raise SourceError(
            f"{where}: truncated file ({size} bytes, a safetensors file has at least 8): "
            "download or copy it again"
        )
    (hlen,) = struct.unpack("<Q", _read_exact(fh, 8, where))
    if hlen > size - 8:
        raise SourceError(
            f"{where}: header length {hlen} is larger than the file ({size} bytes): "
            "the file is truncated or not safetensors"
        )
    if hlen > MAX_HEADER_BYTES:
        raise SourceError(f"{where}: header length {hlen} exceeds {MAX_HEADER_BYTES} bytes")
    raw = _read_exact(fh, hlen, where)
    obj = _decode_json(raw, where)
    data_start = 8 + hlen
    metadata = _metadata(obj.pop("__metadata__", None), where)
    for text in (*obj, *metadata, *metadata.values()):
        _check_unicode(text, where)
    refs = [_tensor_ref(name, info, path, data_start, where) for name, info in obj.items()]
    _check_ranges(refs, data_start, size, where)
    return ShardHeader(path, size, data_start, tuple(refs), metadata)


def _read_exact(fh: BinaryIO, n: int, where: str) -> bytes:
    data = fh.read(n)
    if data is None or len(data) != n:
        got = 0 if data is None else len(data)
        raise SourceError(f"{where}: truncated file (wanted {n} header bytes, got {got})")
    return bytes(data)


def _decode_json(raw: bytes, where: str) -> dict[str, object]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{where}: header is not valid UTF-8 ({exc.reason})") from exc
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys(where))
    except json.JSONDecodeError as exc:
        raise SourceError(
            f"{where}: invalid header JSON ({exc.msg} at byte {exc.pos}): not a safetensors file"
        ) from exc
    except (ValueError, RecursionError) as exc:
        # an integer of thousands of digits (ValueError), or nesting deeper than the stack
        raise SourceError(
            f"{where}: invalid header JSON ({type(exc).__name__}: nesting too deep or a number "
            "too long): not a safetensors file"
        ) from exc
    if not isinstance(obj, dict):
        raise SourceError(f"{where}: header JSON must be an object, got {type(obj).__name__}")
    return obj


def _check_unicode(text: str, where: str) -> None:
    """Refuse strings that cannot be written as UTF-8 (a `\\udXXX` escape of a lone surrogate):
    the reference reader refuses them too, and every writer downstream would fail on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SourceError(
            f"{where}: header string {clip(text)} is not valid Unicode (lone surrogate escape)"
        ) from None


def _no_duplicate_keys(where: str) -> Callable[[list[tuple[str, object]]], dict[str, object]]:
    def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in pairs:
            if key in out:
                raise SourceError(f"{where}: tensor {clip(key)} appears twice in the header")
            out[key] = value
        return out

    return hook


def _metadata(raw: object, where: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise SourceError(f"{where}: __metadata__ must map strings to strings")
    return dict(raw)


def clip(value: object, limit: int = 120) -> str:
    """`repr(value)`, cut to `limit` characters: hostile headers must not make huge messages."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}...({len(text)} chars)"


def _tensor_ref(name: str, info: object, path: Path, data_start: int, where: str) -> TensorRef:
    def bad(why: str) -> SourceError:
        return SourceError(f"{where}: tensor {clip(name)}: {why}")

    if not isinstance(info, dict):
        raise bad("entry must be an object with dtype, shape, data_offsets")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"unknown dtype {clip(dtype)} (known: {', '.join(DTYPES)})")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(_is_nonneg_int(d) for d in shape):
        raise bad(f"shape must be a list of non-negative integers, got {clip(shape)}")
    offsets = info.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_nonneg_int(o) for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise bad(f"data_offsets must be [begin, end] with 0 <= begin <= end, got {clip(offsets)}")
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[dtype].itemsize  # Python ints: no overflow
    if expected != end - begin:
        raise bad(
            f"shape {clip(shape)} of {dtype} needs {expected} bytes "
            f"but data_offsets span {end - begin}"
        )
    if math.prod(d for d in shape if d) > INT64_MAX:
        # a zero dimension makes the byte size 0, but torch still cannot hold the others
        raise bad(f"shape {clip(shape)} has more elements than an int64 can count")
    return TensorRef(name, tuple(shape), dtype, path, data_start + begin, end - begin)


def _is_nonneg_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_ranges(refs: list[TensorRef], data_start: int, size: int, where: str) -> None:
    last_end, last_name = data_start, None
    for ref in sorted(refs, key=lambda r: (r.offset, r.nbytes)):
        end = ref.offset + ref.nbytes
        if end > size:
            raise SourceError(
                f"{where}: tensor {clip(ref.name)}: byte range [{ref.offset}, {end}) exceeds "
                "the file "
                f"({size} bytes): the file is truncated, download or copy it again"
            )
        if ref.offset < last_end and ref.nbytes > 0:
            raise SourceError(
                f"{where}: tensor {clip(ref.name)} overlaps tensor {clip(last_name)} "
                "in the data region"
            )
        if ref.nbytes > 0:
            last_end, last_name = end, ref.name


def header_bytes(tensors: Sequence[TensorRef], metadata: Mapping[str, str]) -> bytes:
    """The header of a safetensors file holding `tensors` back to back, in the order given.

    Each tensor keeps its name, dtype, shape and byte length; offsets are recomputed from 0. The
    JSON is compact and padded with spaces so the data starts 8-byte aligned, as safetensors
    writes it. Returns the length prefix and the JSON.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    pos = 0
    for ref in tensors:
        header[ref.name] = {
            "dtype": ref.dtype,
            "shape": list(ref.shape),
            "data_offsets": [pos, pos + ref.nbytes],
        }
        pos += ref.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
