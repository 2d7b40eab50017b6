"""Bytes to tensors: seek + readinto one tensor's range, view it as its stored dtype, convert.

Shards are opened through a `ShardStore`: `LocalStore` for files on this machine, the Hub's
`StreamingStore` (spectra.sources.hub) for shards fetched on demand.

The only place that reads tensor data. A read holds the raw bytes of one tensor plus the converted
result, never a whole file.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO, Protocol

import torch

from spectra.device import require_host_memory
from spectra.errors import SourceError
from spectra.formats.files import open_input
from spectra.formats.safetensors import DTYPES

_HEX64 = re.compile(r"[0-9a-f]{64}")
_DIGESTS: dict[tuple[str, int, int], str] = {}
_DIGEST_LOCK = threading.Lock()


def read_range(
    fh: BinaryIO,
    *,
    offset: int,
    nbytes: int,
    dtype: str,
    shape: tuple[int, ...],
    where: str,
) -> torch.Tensor:
    """Read `nbytes` at absolute `offset` of `fh` as a tensor of `shape` in its stored dtype.

    The result owns a fresh buffer (a bytearray), so the file can be closed afterwards.
    """
    info = DTYPES[dtype]
    if info.torch_dtype is None:
        raise SourceError(f"{where}: dtype {dtype} cannot be read as numbers by this torch build")
    if sys.byteorder != "little" and info.itemsize > 1:
        raise SourceError(f"{where}: big-endian hosts are not supported (safetensors is LE)")
    if nbytes == 0:
        return torch.empty(shape, dtype=info.torch_dtype)
    require_host_memory(nbytes, f"{where}", "this machine cannot read the tensor whole")
    try:
        buf = bytearray(nbytes)
    except MemoryError:
        raise SourceError(f"{where}: cannot allocate {nbytes:,} bytes to read it") from None
    fh.seek(offset)
    got = fh.readinto(memoryview(buf))
    if got != nbytes:
        raise SourceError(
            f"{where}: truncated data (wanted {nbytes} bytes at offset {offset}, got {got}): "
            "the file changed or is incomplete, download or copy it again"
        )
    return torch.frombuffer(buf, dtype=info.torch_dtype).reshape(shape)


def convert(
    raw: torch.Tensor, *, dtype: torch.dtype | None, device: torch.device, transpose: bool
) -> torch.Tensor:
    """Stored tensor -> `dtype` on `device` (`dtype=None` keeps the stored dtype).

    On an accelerator the raw bytes move first (half the transfer for bf16) and are converted
    there. A transposed result is made contiguous so callers get an ordinary (out, in) matrix.
    """
    target = raw.dtype if dtype is None else dtype
    if device.type != "cpu":
        out = raw.to(device=device).to(dtype=target)
    else:
        out = raw.to(dtype=target)
    if transpose:
        out = out.T.contiguous()
    return out


def shard_digest(path: Path) -> str:
    """sha256 (hex) of a shard file's bytes, memoized in-process per (realpath, size, mtime_ns).

    A Hub cache blob is named by its sha256 already (`.../blobs/<sha256>`), so that name is used
    without reading the file.
    """
    real = os.path.realpath(path)
    name = os.path.basename(real)
    if os.path.basename(os.path.dirname(real)) == "blobs" and _HEX64.fullmatch(name):
        return name
    try:
        st = os.stat(real)
    except OSError as exc:
        raise SourceError(f"{path}: cannot stat shard ({exc.strerror or exc})") from exc
    key = (real, st.st_size, st.st_mtime_ns)
    with _DIGEST_LOCK:
        cached = _DIGESTS.get(key)
    if cached is not None:
        return cached
    digest = _hash_file(Path(real))
    with _DIGEST_LOCK:
        _DIGESTS[key] = digest
    return digest


def _hash_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    try:
        with open_input(path, "shard") as fh:
            while n := fh.readinto(view):
                h.update(view[:n])
    except OSError as exc:
        raise SourceError(f"{path}: cannot read shard to hash it ({exc.strerror or exc})") from exc
    return h.hexdigest()


class ShardStore(Protocol):
    """Gives access to shard files: local files as they are, or Hub shards fetched on demand."""

    def open(self, shard: Path) -> AbstractContextManager[BinaryIO]:
        """Open `shard` for reading (fetching it first if needed; it may be dropped on exit)."""
        ...

    def digest(self, shard: Path) -> str:
        """sha256 of the shard's bytes."""
        ...

    def close(self) -> None:
        """Release whatever the store holds (temporary downloads)."""
        ...


class LocalStore:
    """Shards that are files on this machine."""

    def open(self, shard: Path) -> AbstractContextManager[BinaryIO]:
        return open_input(shard, "shard")

    def digest(self, shard: Path) -> str:
        return shard_digest(shard)

    def close(self) -> None:
        return None
