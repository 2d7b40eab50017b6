"""Bytes to tensors: seek + readinto one tensor's range, view it as its stored dtype, convert.

Shards are opened through a `ShardStore`: `LocalStore` for files on this machine, the Hub's
`StreamingStore` (spectra.sources.hub) for shards fetched on demand.

The only place that reads tensor data. A read holds the raw bytes of one tensor plus the converted
result, never a whole file.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from spectra.device import require_host_memory
from spectra.errors import SourceError, ValidationError
from spectra.formats.codec import Encoded, decode
from spectra.formats.files import open_input
from spectra.formats.safetensors import DTYPES, TensorRef

if TYPE_CHECKING:  # torch is imported by the functions that make tensors: listing a
    import torch  # checkpoint's headers (`spectra inspect`) never imports it


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
    import torch

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


def read_part(fh: BinaryIO, ref: TensorRef) -> torch.Tensor:
    """The tensor `ref` as stored (its dtype and shape), read from `fh`, the file of its shard."""
    return read_range(
        fh,
        offset=ref.offset,
        nbytes=ref.nbytes,
        dtype=ref.dtype,
        shape=ref.shape,
        where=f"{ref.shard}: tensor {ref.name!r}",
    )


def read_encoded(open_shard: Callable[[Path], BinaryIO], encoded: Encoded) -> torch.Tensor:
    """The decoded float32 tensor of `encoded`: every part read as stored from the file
    `open_shard(part.shard)` returns (open files, owned by the caller), then decoded. Holds one
    matrix's parts and its decode at a time."""
    parts = [read_part(open_shard(p.shard), p) for p in encoded.parts]
    return decode(encoded, parts)


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """`dtype` itself, or the torch dtype its name (`"float32"`) names."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(found, torch.dtype):
        raise ValidationError(f"unknown dtype {str(dtype)[:40]!r}: use a torch dtype or its name")
    return found


def convert(
    raw: torch.Tensor, *, dtype: torch.dtype | str | None, device: torch.device, transpose: bool
) -> torch.Tensor:
    """Stored tensor -> `dtype` on `device` (`dtype=None` keeps the stored dtype; a name such as
    `"float32"` is the torch dtype of that name).

    On an accelerator the raw bytes move first (half the transfer for bf16) and are converted
    there. A transposed result is made contiguous so callers get an ordinary (out, in) matrix.
    """
    target = raw.dtype if dtype is None else torch_dtype(dtype)
    if device.type != "cpu":
        out = raw.to(device=device).to(dtype=target)
    else:
        out = raw.to(dtype=target)
    if transpose:
        out = out.T.contiguous()
    return out


@dataclass(frozen=True)
class FileIdentity:
    """What a stat says about a file's bytes: device, inode, size, mtime and ctime (ns).

    The ctime cannot be set by `cp -p`, `rsync -t`, `tar -x` or `os.utime` (setting the mtime
    bumps it), and a replacement by rename changes the inode: equal identities mean the file was
    not written since (up to the timestamp granularity, see `ShardDigest.settled`). Git's index
    trusts the same fields.
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class ShardDigest:
    """The sha256 of a shard's bytes and the identity of the file it was read from.

    settled: the file's ctime was more than `RACY_NS` before the hash began, so a later write
        necessarily moves the ctime and an equal identity proves equal bytes. A racy digest
        (the file changed just before it was hashed: a write in the same timestamp tick could go
        unseen) is never reused on identity alone: it is re-hashed when used again.
    """

    sha256: str
    identity: FileIdentity
    settled: bool


RACY_NS = 2_000_000_000
"""A digest is settled when the file's ctime precedes the hash by more than this (covers coarse
filesystem timestamps: 1-2 s on FAT/HFS+/some NFS servers, a few ms on ext4/xfs/btrfs)."""

_MEMO: dict[str, ShardDigest] = {}
_MEMO_LOCK = threading.Lock()


def file_identity(path: str | Path) -> FileIdentity:
    """The `FileIdentity` of `path` (symlinks followed); SourceError when it cannot be statted."""
    try:
        return FileIdentity.of(os.stat(path))
    except OSError as exc:
        raise SourceError(f"{path}: cannot stat shard ({exc.strerror or exc})") from exc


def hash_shard(path: str | Path, *, tries: int = 3, chunk: int = 8 << 20) -> ShardDigest:
    """sha256 of the file's bytes, read once, with its identity before and after the read.

    A file whose identity changes while it is hashed is hashed again (`tries` times in all),
    then refused: its digest would belong to no version of the file.
    """
    real = os.path.realpath(path)
    for _ in range(tries):
        start = time.time_ns()
        h = hashlib.sha256()
        buf = bytearray(chunk)
        view = memoryview(buf)
        try:
            with open_input(real, "shard") as fh:
                before = FileIdentity.of(os.fstat(fh.fileno()))
                while n := fh.readinto(view):
                    h.update(view[:n])
        except OSError as exc:
            raise SourceError(
                f"{path}: cannot read shard to hash it ({exc.strerror or exc})"
            ) from exc
        if file_identity(real) == before:
            return ShardDigest(h.hexdigest(), before, before.ctime_ns + RACY_NS < start)
    raise SourceError(
        f"{path}: the file kept changing while it was hashed ({tries} tries): "
        "wait until whatever writes it has finished, then run again"
    )


def shard_record(path: str | Path) -> ShardDigest:
    """The `ShardDigest` of `path`, memoized in-process by realpath and re-verified by content
    whenever the file's identity changed or the memoized digest is not settled.

    A Hub cache blob is a file like any other: its name (the sha256 the Hub announced) is not
    trusted, since a corrupted or truncated blob keeps its name.
    """
    real = os.path.realpath(path)
    current = file_identity(real)
    with _MEMO_LOCK:
        hit = _MEMO.get(real)
    if hit is not None and hit.settled and hit.identity == current:
        return hit
    record = hash_shard(real)
    with _MEMO_LOCK:
        _MEMO[real] = record
    return record


def confirm_unchanged(path: str | Path, record: ShardDigest) -> ShardDigest:
    """`record`, or a settled re-hash of it, when `path` still holds the bytes `record` was
    hashed from; SourceError when it changed since (call it after reading the bytes that are
    about to be stored under `record.sha256`).

    An equal identity proves it for a settled record; a racy one is re-hashed as well.
    """
    current = file_identity(path)
    if current == record.identity:
        if record.settled:
            return record
        again = hash_shard(path)
        if again.sha256 == record.sha256 and again.identity == record.identity:
            return again
        current = again.identity
    changed = [
        f.name
        for f in fields(FileIdentity)
        if getattr(current, f.name) != getattr(record.identity, f.name)
    ]
    what = ", ".join(changed) if changed else "its bytes"
    raise SourceError(
        f"{path}: the file changed while spectra was reading it ({what} changed): results "
        "would mix two versions of it, so none of the changed bytes' spectra were cached; "
        "run again once nothing writes it"
    )


def shard_digest(path: str | Path) -> str:
    """sha256 (hex) of a shard file's bytes (`shard_record(path).sha256`)."""
    return shard_record(path).sha256


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

    def windows(self, shards: Sequence[Path]) -> list[list[Path]]:
        """`shards` (in reading order) cut into consecutive runs to read together: a pass that
        reads run by run opens each shard's bytes once (one run for local files)."""
        ...


class LocalStore:
    """Shards that are files on this machine."""

    def open(self, shard: Path) -> AbstractContextManager[BinaryIO]:
        return open_input(shard, "shard")

    def digest(self, shard: Path) -> str:
        return shard_digest(shard)

    def close(self) -> None:
        return None

    def windows(self, shards: Sequence[Path]) -> list[list[Path]]:
        return [list(shards)] if shards else []
