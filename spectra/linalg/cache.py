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
import json
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from spectra.blobcache import default_cache_dir
from spectra.errors import CacheError, ValidationError
from spectra.linalg.spectrum import Spectrum
from spectra.sources.reader import ShardDigest, file_identity, hash_shard

CACHE_FORMAT = 2
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
            payload_path = path.with_name(meta["payload"])
            payload = payload_path.read_bytes()
            if hashlib.sha256(payload).hexdigest() != meta["sha256"]:
                raise ValueError("payload checksum mismatch")
            tensors = st_load(payload)
            return _spectrum_from(meta, tensors)
        except (ValueError, KeyError, TypeError, OSError, RecursionError, ValidationError) as exc:
            # json.JSONDecodeError, UnicodeDecodeError and safetensors' errors are ValueErrors or
            # OSErrors; ValidationError: a Spectrum field out of its domain
            self._report(f"corrupted spectrum cache entry {path.name} ({exc}); recomputing it")
            self._remove(path)
            return None

    def put(self, key: str, spectrum: Spectrum) -> None:
        """Store `spectrum` under `key` (failed spectra are not stored)."""
        if not spectrum.ok:
            return
        tensors = {"values": spectrum.values.detach().to("cpu", torch.float64).contiguous()}
        for name in ("U", "Vh"):
            t = getattr(spectrum, name)
            if t is not None:
                tensors[name] = t.detach().cpu().contiguous()
        payload = st_save(tensors)
        digest = hashlib.sha256(payload).hexdigest()
        path = self._json_path(key)
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "payload": f"{key}.{digest[:16]}.safetensors",
            "sha256": digest,
            "shape": list(spectrum.shape),
            **{f: getattr(spectrum, f) for f in _SPECTRUM_FIELDS},
            "extras": dict(spectrum.extras),
        }
        # the digest is taken over what a reader will parse (default=str turns exotic values
        # into strings), so writer and reader hash the same canonical text
        meta = json.loads(json.dumps(meta, default=str))
        meta["meta_sha256"] = _meta_digest(meta)
        _atomic_write(path.with_name(meta["payload"]), payload)
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    except OSError as exc:
        raise CacheError(
            f"cannot write the spectrum cache at {path.parent}: {exc.strerror or exc}; "
            "choose another folder (--cache-dir / SPECTRA_CACHE_DIR) or disable it (--no-cache)"
        ) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise CacheError(f"cannot write cache file {path}: {exc.strerror or exc}") from exc
