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
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import tempfile
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

from spectra.errors import ValidationError

BLOB_FORMAT = 1
_NAMESPACE = re.compile(r"[a-z][a-z0-9_-]{0,39}")
_KEY = re.compile(r"[0-9a-f]{64}")


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

    def __init__(self, root: str | os.PathLike[str] | None, namespace: str) -> None:
        if not _NAMESPACE.fullmatch(namespace):
            raise ValidationError(f"blob cache namespace {namespace!r}: use [a-z][a-z0-9_-]*")
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self._dir = self.root / "blobs" / f"v{BLOB_FORMAT}" / namespace

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

    def keys(self) -> Iterable[str]:
        """Every stored key (for tests and cleanup)."""
        if not self._dir.is_dir():
            return []
        return sorted(p.stem for p in self._dir.glob("??/*.bin"))
