"""On-disk spectrum cache: safetensors payloads + JSON metadata, keyed by content and parameters.

Layout under the root (default `$SPECTRA_CACHE_DIR`, else `$XDG_CACHE_HOME/spectra`, else
`~/.cache/spectra`):

    v2/entries/<ab>/<key>.json                      metadata + sha256 of the payload file
    v2/entries/<ab>/<key>.<sha256[:16]>.safetensors values (float64), optional U and Vh
    v2/shards.json                                  memo of shard digests by path and identity

(Outputs derived from spectra, plots and whole analyses, live next to it under `blobs/`:
`spectra.blobcache`.)

`key = sha256(format version, content key of the matrix's bytes, decomposition parameters)`.
Every file is written to a temporary sibling and renamed into place (`os.replace`), the payload
first, the JSON last: the JSON is the commit record, and it names a payload file whose name
carries its own checksum, so processes writing the same entry at once can never pair a JSON with
another writer's payload. A truncated or corrupted entry (bad or non-UTF-8 JSON, missing
payload, payload or metadata checksum mismatch) is reported (`warnings.warn` with
`CacheCorruptionWarning`, or the `on_corrupt` callback), removed, and treated as a miss, so the
caller recomputes it. Nothing is pickled.

Payloads are streamed: `put` writes (and hashes) each tensor in row blocks of at most
PAYLOAD_BLOCK_BYTES, `get` reads (and hashes) them in blocks straight into the tensors it
returns, so storing or loading an entry costs one block beside its tensors, not a whole copy of
them (compare caches a float64 m x min(m, n) U: 500 MiB for a 32000 x 2048 matrix). The payload
is a plain safetensors file (the header from `spectra.formats.safetensors.header_bytes`), so
entries written by `safetensors.torch.save` (before streaming) read the same, and the reference
reader reads ours.

Per-matrix extras (`Spectrum.extras`, e.g. the outlier ratio: pure functions of the same bytes)
are kept in the metadata under "extras" (covered by `meta_sha256`); entries without the field
load with no extras.

Checksums (format 2): `sha256` covers the payload bytes; `meta_sha256` covers the metadata, as
the sha256 of its canonical JSON (sorted keys, no spaces, ASCII) without the `meta_sha256`
field itself. Since the metadata holds the payload's digest, one check on each file covers every
byte a `Spectrum` is built from: a flipped digit in `shape` or `params` is a corrupt entry, not
a served one. Format 1 (payload checksum only) lived under `v1/`; its entries are ignored, not
migrated (they are recomputed on demand).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from spectra.blobcache import default_cache_dir
from spectra.errors import CacheError, SourceError, ValidationError
from spectra.formats.safetensors import (
    DTYPES,
    MAX_HEADER_BYTES,
    TensorRef,
    dtype_name_of,
    header_bytes,
    parse_header,
)
from spectra.linalg.spectrum import Spectrum
from spectra.sources.reader import ShardDigest, file_identity, hash_shard

CACHE_FORMAT = 2
# Bytes of a payload tensor written or read (and hashed) at once. 16 MiB: within the 64 MiB
# float64 slices compare's working memory already counts (GRAM_SLICE_BYTES), and large enough
# that the per-block Python cost is nothing next to the bytes moved.
PAYLOAD_BLOCK_BYTES = 16 << 20
_SPECTRUM_FIELDS = ("method", "params", "residual", "converged", "iterations", "status", "message")


class CacheCorruptionWarning(UserWarning):
    """A cache entry was unreadable or did not match its checksum; it will be recomputed."""


class SpectrumCache:
    """Spectra on disk so report, compare and init reuse work and interrupted runs resume.

    root: cache folder (default `default_cache_dir()`); created on first write.
    on_corrupt: called with a one-line message when a corrupted entry is found (default:
        `warnings.warn(..., CacheCorruptionWarning)`).

    >>> import tempfile
    >>> cache = SpectrumCache(tempfile.mkdtemp())
    >>> key = cache.entry_key("sha:0:16:F32:2x2", {"mode": "values"})
    >>> cache.get(key) is None
    True
    """

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        on_corrupt: Callable[[str], None] | None = None,
    ) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self._dir = self.root / f"v{CACHE_FORMAT}"
        self._on_corrupt = on_corrupt
        self._shards: dict[str, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SpectrumCache({str(self.root)!r})"

    # -- keys --------------------------------------------------------------------------------
    @staticmethod
    def entry_key(content_key: str, params: Mapping[str, Any]) -> str:
        """sha256 hex of the format version, the content key and the (JSON) parameters."""
        blob = json.dumps(
            {"format": CACHE_FORMAT, "content": content_key, "params": dict(params)},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def _json_path(self, key: str) -> Path:
        return self._dir / "entries" / key[:2] / f"{key}.json"

    # -- entries -----------------------------------------------------------------------------
    def contains(self, key: str) -> bool:
        """Whether an entry for `key` exists (not verified; `get` verifies)."""
        return self._json_path(key).is_file()

    def get(self, key: str) -> Spectrum | None:
        """The cached Spectrum (`from_cache=True`, no key/role/layer), or None when absent or
        corrupted (then reported and removed)."""
        path = self._json_path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CacheError(f"cannot read cache entry {path}: {exc.strerror or exc}") from exc
        try:
            meta = json.loads(raw.decode("utf-8"))  # UnicodeDecodeError is a ValueError
            if not isinstance(meta, dict):
                raise ValueError(f"metadata is a JSON {type(meta).__name__}, not an object")
            if meta.get("meta_sha256") != _meta_digest(meta):
                raise ValueError("metadata checksum mismatch")
            tensors = _read_payload(path.with_name(meta["payload"]), meta["sha256"])
            return _spectrum_from(meta, tensors)
        except (
            ValueError,
            KeyError,
            TypeError,
            OSError,
            RecursionError,
            SourceError,
            ValidationError,
        ) as exc:
            # json.JSONDecodeError and UnicodeDecodeError are ValueErrors; SourceError: a
            # malformed payload header; ValidationError: a Spectrum field out of its domain
            self._report(f"corrupted spectrum cache entry {path.name} ({exc}); recomputing it")
            self._remove(path)
            return None

    def put(self, key: str, spectrum: Spectrum) -> None:
        """Store `spectrum` under `key` (failed spectra are not stored)."""
        if not spectrum.ok:
            return
        tensors = {"values": spectrum.values.detach().to("cpu", torch.float64)}
        for name in ("U", "Vh"):
            t = getattr(spectrum, name)
            if t is not None:
                tensors[name] = t.detach()  # any layout, any device: streamed in row blocks
        path = self._json_path(key)
        payload = _write_payload(path.parent, key, tensors)
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "payload": payload.name,
            "sha256": payload.digest,
            "shape": list(spectrum.shape),
            **{f: getattr(spectrum, f) for f in _SPECTRUM_FIELDS},
            "extras": dict(spectrum.extras),
        }
        # the digest is taken over what a reader will parse (default=str turns exotic values
        # into strings), so writer and reader hash the same canonical text
        meta = json.loads(json.dumps(meta, default=str))
        meta["meta_sha256"] = _meta_digest(meta)
        _atomic_write(path, json.dumps(meta, sort_keys=True).encode())

    def clear(self) -> None:
        """Remove every entry of this cache format (the folder itself stays)."""
        entries = self._dir / "entries"
        if not entries.is_dir():
            return
        for sub in entries.iterdir():
            for f in sub.iterdir():
                f.unlink(missing_ok=True)
            sub.rmdir()

    def _report(self, message: str) -> None:
        if self._on_corrupt is not None:
            self._on_corrupt(message)
        else:
            warnings.warn(message, CacheCorruptionWarning, stacklevel=3)

    @staticmethod
    def _remove(json_path: Path) -> None:
        for f in json_path.parent.glob(f"{json_path.stem}*"):
            try:
                f.unlink()
            except OSError:
                pass  # another process removed or replaced it; the next get() sees the result

    # -- shard digests -----------------------------------------------------------------------
    def shard_record(
        self, path: str | Path, compute: Callable[[Path], ShardDigest] = hash_shard
    ) -> ShardDigest:
        """The digest of shard `path`, remembered across runs by its realpath and identity
        (device, inode, size, mtime_ns, ctime_ns), so a second run does not rehash multi-GB
        shards while any write, `cp -p`, `rsync -t`, `tar -x` or `touch` (all move the ctime) or
        a replacement (a new inode) makes it hash again. `compute(path)` hashes on a miss; only
        settled digests are remembered (see `ShardDigest.settled`)."""
        real = os.path.realpath(path)
        current = file_identity(real)
        with self._lock:
            hit = self._load_shards().get(real)
        if isinstance(hit, dict) and hit.get("identity") == asdict(current):
            sha = hit.get("sha256")
            if isinstance(sha, str):
                return ShardDigest(sha, current, settled=True)
        record = compute(Path(real))
        if record.settled:
            with self._lock:
                memo = self._load_shards()
                memo[real] = {"identity": asdict(record.identity), "sha256": record.sha256}
                self._save_shards(memo)
        return record

    def _load_shards(self) -> dict[str, dict[str, Any]]:
        if self._shards is None:
            try:
                data = json.loads((self._dir / "shards.json").read_text(encoding="utf-8"))
                self._shards = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._shards = {}  # absent or unreadable: rebuilt as shards are hashed
        return self._shards

    def _save_shards(self, memo: dict[str, dict[str, Any]]) -> None:
        path = self._dir / "shards.json"
        try:  # merge with what other processes wrote meanwhile (lost updates only cost a rehash)
            disk = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(disk, dict):
                memo = {**disk, **memo}
        except (OSError, ValueError):
            pass
        self._shards = memo
        _atomic_write(path, json.dumps(memo, sort_keys=True).encode())


def resolve_cache(cache: SpectrumCache | str | Path | bool | None) -> SpectrumCache | None:
    """The cache a `cache=` argument means: True -> the default folder, a path -> that folder,
    a SpectrumCache -> itself, None/False -> no cache."""
    if cache is None or cache is False:
        return None
    if cache is True:
        return SpectrumCache()
    if isinstance(cache, (str, Path)):
        return SpectrumCache(Path(cache))
    return cache


def _meta_digest(meta: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of `meta` without its `meta_sha256` field."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _spectrum_from(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Spectrum:
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"cache format {meta.get('format')!r}, expected {CACHE_FORMAT}")
    kwargs = {f: meta[f] for f in _SPECTRUM_FIELDS}
    extras = meta.get("extras", {})  # absent in entries written before extras existed
    if not isinstance(extras, dict):
        raise ValueError(f"extras is a JSON {type(extras).__name__}, not an object")
    return Spectrum(
        values=tensors["values"],
        U=tensors.get("U"),
        Vh=tensors.get("Vh"),
        shape=(int(meta["shape"][0]), int(meta["shape"][1])),
        from_cache=True,
        extras=extras,
        **kwargs,
    )


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temporary sibling of `path`, then rename it over `path`."""

    def fill(fh: BinaryIO) -> Path:
        fh.write(data)
        return path

    _write_atomically(path.parent, path.suffix, fill)


def _write_atomically(folder: Path, suffix: str, fill: Callable[[BinaryIO], Path]) -> Path:
    """Create a temporary file in `folder`, let `fill` write it and name its final path (in
    `folder`), then rename it there; the temporary file is removed when anything fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    except OSError as exc:
        raise CacheError(
            f"cannot write the spectrum cache at {folder}: {exc.strerror or exc}; "
            "choose another folder (--cache-dir / SPECTRA_CACHE_DIR) or disable it (--no-cache)"
        ) from exc
    target = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as fh:
            target = fill(fh)
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise CacheError(f"cannot write cache file {target}: {exc.strerror or exc}") from exc
        raise
    return target


@dataclass(frozen=True)
class _Payload:
    """Where `_write_payload` put an entry's tensors: the file name and the sha256 of its bytes."""

    name: str
    digest: str


def _write_payload(folder: Path, key: str, tensors: Mapping[str, torch.Tensor]) -> _Payload:
    """Write `tensors` as one safetensors file `<key>.<sha256[:16]>.safetensors` in `folder`,
    streamed: each tensor goes out in row-major blocks of at most PAYLOAD_BLOCK_BYTES (a
    column-major or on-device U is copied one block at a time, never whole), hashed as written.
    The bytes are those of a row-major tensor, whatever its layout in memory."""
    refs = [
        TensorRef(name, tuple(t.shape), _payload_dtype(t.dtype), folder, 0, t.nbytes)
        for name, t in tensors.items()
    ]
    head = header_bytes(refs, {})
    sha = hashlib.sha256(head)

    def fill(fh: BinaryIO) -> Path:
        fh.write(head)
        for t in tensors.values():
            for block in _row_blocks(t):
                sha.update(block)
                fh.write(block)
        return folder / f"{key}.{sha.hexdigest()[:16]}.safetensors"

    path = _write_atomically(folder, ".safetensors", fill)
    return _Payload(path.name, sha.hexdigest())


def _payload_dtype(dtype: torch.dtype) -> str:
    try:
        return dtype_name_of(dtype)
    except ValueError:
        raise ValidationError(f"the spectrum cache cannot store {dtype} tensors") from None


def _row_blocks(t: torch.Tensor) -> Iterator[memoryview]:
    """The bytes of `t` in row-major (C) order, as blocks of whole rows of at most
    PAYLOAD_BLOCK_BYTES (one row when a row is larger), each a fresh contiguous CPU copy only
    when `t`'s own rows are not one."""
    if t.numel() == 0:
        return
    rows = t.reshape(-1, 1) if t.ndim <= 1 else t.reshape(t.shape[0], -1)  # views for 1-D, 2-D
    step = max(1, PAYLOAD_BLOCK_BYTES // (rows.shape[1] * rows.element_size()))
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step].to("cpu").contiguous()
        yield memoryview(block.reshape(-1).view(torch.uint8).numpy())


def _read_payload(path: Path, digest: str) -> dict[str, torch.Tensor]:
    """The tensors of the payload file `path`, each read in blocks of PAYLOAD_BLOCK_BYTES
    straight into its own (row-major) tensor while every byte of the file is hashed in order;
    ValueError when the sha256 is not `digest` or the file is short, SourceError when its
    header is malformed."""
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        prefix = fh.read(8)
        if len(prefix) != 8:
            raise ValueError(f"payload truncated ({size} bytes)")
        (hlen,) = struct.unpack("<Q", prefix)
        if hlen > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"payload header length {hlen} does not fit the file ({size} bytes)")
        head = prefix + fh.read(hlen)
        header = parse_header(io.BytesIO(head), size, path)
        sha = hashlib.sha256(head)
        pos = header.data_start
        for ref in header.in_data_order():
            dtype = DTYPES[ref.dtype].torch_dtype
            if dtype is None:
                raise ValueError(f"payload dtype {ref.dtype} has no torch dtype here")
            t = torch.empty(ref.shape, dtype=dtype)
            if ref.nbytes:
                _hash_through(fh, sha, ref.offset - pos)  # a gap (none in files we write)
                _read_hashed(fh, sha, memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                pos = ref.offset + ref.nbytes
            out[ref.name] = t
        _hash_through(fh, sha, size - pos)
    if sha.hexdigest() != digest:
        raise ValueError("payload checksum mismatch")
    return out


def _read_hashed(fh: BinaryIO, sha: Any, buf: memoryview) -> None:
    """Fill `buf` from `fh` in blocks of at most PAYLOAD_BLOCK_BYTES, hashing each."""
    done = 0
    while done < len(buf):
        chunk = buf[done : done + PAYLOAD_BLOCK_BYTES]
        got = fh.readinto(chunk)
        if not got:
            raise ValueError("payload truncated")
        sha.update(chunk[:got])
        done += got


def _hash_through(fh: BinaryIO, sha: Any, n: int) -> None:
    """Read and hash the next `n` bytes of `fh` (bytes no tensor holds)."""
    while n > 0:
        data = fh.read(min(n, PAYLOAD_BLOCK_BYTES))
        if not data:
            raise ValueError("payload truncated")
        sha.update(data)
        n -= len(data)
