"""Outputs derived from spectra, on disk next to them: byte blobs keyed by what made them.

A plot's PNG or a whole cached analysis is a pure function of its inputs (eigenvalues, metrics,
options) and of the code that made it. `BlobCache` stores such bytes under
`<cache root>/blobs/v1/<namespace>/<ab>/<key>.bin`, where the caller's key is a sha256 over
every input and over `code_digest(...)` of the modules that turn inputs into bytes, so an edited
plotting module (or a new spectra version) misses instead of serving a stale picture.

Each file is the 64-hex sha256 of the body, a newline, then the body; it is written to a
temporary sibling and renamed into place, so readers see a whole file or none, and a file whose
checksum does not match is removed and treated as a miss (the caller recomputes it). Nothing is
pickled. This module imports no torch, numpy or matplotlib: a cached rerun that finds everything
here never loads them.

The store is bounded (`DEFAULT_MAX_MB`, or `$SPECTRA_BLOB_CACHE_MB`, or `max_mb=`): when a write
takes `<root>/blobs/` (every namespace) over the bound, the least recently used blobs are removed
(`trim_blobs`) until it holds 90% of it. "Used" is the file's access time, which a read here sets
explicitly (mounts with `noatime` or `relatime` do not keep it); blobs this process has read or
written (the run in progress: its analysis and its plots) are never removed by it, so a bound
smaller than one run's outputs keeps that run's and nothing older. Temporary files left by a
killed writer are removed once an hour old.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

from spectra.errors import ValidationError

BLOB_FORMAT = 1
_NAMESPACE = re.compile(r"[a-z][a-z0-9_-]{0,39}")
_KEY = re.compile(r"[0-9a-f]{64}")
#: Default bound of `<root>/blobs/` in MiB: a MiniLM report stores ~2.6 MB there (44 PNGs and
#: its analysis), a 7B one ~10 MB, so a few hundred reports' outputs.
DEFAULT_MAX_MB = 1024
#: The environment variable that sets the bound (MiB, an integer >= 0).
MAX_MB_ENV = "SPECTRA_BLOB_CACHE_MB"
#: A trim leaves the store at this share of the bound, so it does not rescan on every write.
TRIM_TO = 0.9
#: A writer's temporary file older than this (seconds) is a killed writer's: removed by a trim.
STALE_TMP_S = 3600.0
#: Blob files this process read or wrote (the run in progress): never removed by its trims.
_IN_USE: set[str] = set()


def default_cache_dir() -> Path:
    """`$SPECTRA_CACHE_DIR`, else `$XDG_CACHE_HOME/spectra`, else `~/.cache/spectra`."""
    env = os.environ.get("SPECTRA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "spectra"


@cache
def code_digest(*modules: str) -> str:
    """sha256 hex over the source files of `modules` (dotted names, found without importing
    them; a package counts every .py file under its folder) and the spectra version: the "code
    version" part of a derived output's key. A module without a readable source file
    contributes its name only (the version still counts)."""
    from spectra import __version__

    h = hashlib.sha256(f"spectra {__version__}\n".encode())
    for name in modules:
        h.update(f"{name}\n".encode())
        for path in _source_files(name):
            with open(path, "rb") as f:
                h.update(f"{os.path.basename(path)}\0".encode() + hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _source_files(name: str) -> list[str]:
    """The .py files of module `name`: its file, or every file under a package's folder."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        return []
    if spec.submodule_search_locations:
        found = []
        for folder in spec.submodule_search_locations:
            for parent, dirs, files in os.walk(folder):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                found += [os.path.join(parent, f) for f in sorted(files) if f.endswith(".py")]
        return found
    origin = spec.origin
    return [origin] if origin and os.path.isfile(origin) else []


def blob_cache_max_mb(value: int | None = None) -> int:
    """The bound of the blob store in MiB: `value`, else `$SPECTRA_BLOB_CACHE_MB`, else
    `DEFAULT_MAX_MB` (a ValidationError for anything but an integer >= 0)."""
    text = os.environ.get(MAX_MB_ENV) if value is None else value
    if text is None or text == "":
        return DEFAULT_MAX_MB
    try:
        mb = int(text)
    except (TypeError, ValueError):
        mb = -1
    if mb < 0 or isinstance(text, bool):
        where = f"{MAX_MB_ENV}={str(text)[:40]!r}" if value is None else f"max_mb={value!r}"
        raise ValidationError(
            f"{where}: the blob cache bound is a whole number of MiB >= 0, e.g. 1024 (0 keeps "
            "only the outputs of the run in progress)"
        )
    return mb


def _blob_files(top: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(path, stat) of every file under `top` (`<root>/blobs`), any namespace and version."""
    for parent, _dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(parent, name)
            try:
                yield path, os.stat(path)
            except OSError:  # removed by another process meanwhile
                continue


def trim_blobs(root: str | os.PathLike[str], max_bytes: int) -> int:
    """Remove the least recently used blob files under `<root>/blobs/` (oldest access time
    first; never one this process has read or written) until the rest hold at most
    `max_bytes`, and temporary files older than `STALE_TMP_S`. Returns the bytes left. Files
    another process removes meanwhile are skipped; an undeletable one is left in place."""
    now = time.time()
    entries = []
    total = 0
    for path, st in _blob_files(Path(root) / "blobs"):
        if os.path.basename(path).startswith(".tmp-"):
            if now - st.st_mtime > STALE_TMP_S and _remove(path):
                continue
        entries.append((st.st_atime, path, st.st_size))
        total += st.st_size
    entries.sort()
    for _atime, path, size in entries:
        if total <= max_bytes:
            break
        if path not in _IN_USE and not os.path.basename(path).startswith(".tmp-"):
            if _remove(path):
                total -= size
    return total


def _remove(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def blob_key(*parts: Any) -> str:
    """sha256 hex of `parts`: strings, numbers, None, lists/dicts of them (canonical JSON) and
    bytes (hashed)."""
    h = hashlib.sha256(f"blob {BLOB_FORMAT}\n".encode())
    for part in parts:
        if isinstance(part, (bytes, bytearray, memoryview)):
            h.update(b"b" + hashlib.sha256(part).digest())
        else:
            text = json.dumps(part, sort_keys=True, separators=(",", ":"), default=str)
            h.update(b"j" + hashlib.sha256(text.encode()).digest())
    return h.hexdigest()


class BlobCache:
    """Checksummed byte blobs of one `namespace` ("plots", "analysis") under a cache root.

    Reads and writes never raise for the cache's own sake: an unreadable or unwritable cache
    is a miss (the output is recomputed), never a failed command.
    """

    def __init__(
        self, root: str | os.PathLike[str] | None, namespace: str, *, max_mb: int | None = None
    ) -> None:
        if not _NAMESPACE.fullmatch(namespace):
            raise ValidationError(f"blob cache namespace {namespace!r}: use [a-z][a-z0-9_-]*")
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self._dir = self.root / "blobs" / f"v{BLOB_FORMAT}" / namespace
        #: the bound of `<root>/blobs/` (every namespace) in bytes, checked after each write
        self.max_bytes = blob_cache_max_mb(max_mb) << 20
        self._stored: int | None = None  # bytes under blobs/: scanned at the first write
        self._next_trim = self.max_bytes  # raised when a trim could not get under the bound

    def __repr__(self) -> str:
        return f"BlobCache({str(self._dir)!r})"

    def _path(self, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise ValidationError(f"blob cache key must be 64 hex digits, got {key[:80]!r}")
        return self._dir / key[:2] / f"{key}.bin"

    def get(self, key: str) -> bytes | None:
        """The bytes stored under `key`, or None when absent, unreadable or corrupted (then
        removed)."""
        path = self._path(key)
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        head, sep, body = raw.partition(b"\n")
        if sep and head == hashlib.sha256(body).hexdigest().encode():
            _IN_USE.add(str(path))
            try:  # the access time is what a trim orders by: set it, whatever the mount does
                os.utime(path, ns=(time.time_ns(), os.stat(path).st_mtime_ns))
            except OSError:
                pass
            return body
        path.unlink(missing_ok=True)
        return None

    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key` (atomically; a failure to write is ignored)."""
        path = self._path(key)
        body = hashlib.sha256(data).hexdigest().encode() + b"\n" + data
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".bin")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(body)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            return
        _IN_USE.add(str(path))
        self._bound(len(body))

    def _bound(self, written: int) -> None:
        """Keep `<root>/blobs/` within `max_bytes` after a write of `written` bytes: one scan
        at the first write, then a running count (other processes' writes are seen at the next
        trim's scan)."""
        if self._stored is None:
            self._stored = sum(st.st_size for _p, st in _blob_files(self.root / "blobs"))
        else:
            self._stored += written
        if self._stored > self._next_trim:
            self._stored = trim_blobs(self.root, int(self.max_bytes * TRIM_TO))
            # what is left over the bound is in use: trim (rescan) again only after another
            # tenth of the bound (at least 1 MiB) was written, not after every write
            step = max(self.max_bytes // 10, 1 << 20)
            self._next_trim = max(self.max_bytes, self._stored + step)

    def keys(self) -> Iterable[str]:
        """Every stored key (for tests and cleanup)."""
        if not self._dir.is_dir():
            return []
        return sorted(p.stem for p in self._dir.glob("??/*.bin"))
