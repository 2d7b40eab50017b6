"""``spectra.json``: what an init run did, so a result can be traced and reproduced.

Fields: ``format`` (manifest version), ``kind`` ("init" or "convert"), ``method``, ``source``
(as given) and ``source_files`` (name, bytes, sha256 of every shard read), ``options``,
``plan`` (per-module rank, alpha, scale, role, layer, shape), ``allocation`` (allocator, budget,
formula, ranks) when ranks were allocated, ``matrices`` (per matrix: relative reconstruction
error ``||W - (W_res + s B A)||_F / ||W||_F`` measured after casting the residual to its storage
dtype, and the decomposition facts), ``versions``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from spectra.analysis.results import json_safe
from spectra.errors import SourceError
from spectra.formats.files import open_input, read_json_input

MANIFEST_NAME = "spectra.json"
FORMAT_VERSION = 1
_PACKAGES = ("spectra", "torch", "safetensors", "numpy", "peft", "transformers")


def file_sha256(path: Path, *, chunk: int = 8 << 20) -> str:
    """sha256 hex digest of a file, read in chunks (memory bounded)."""
    digest = hashlib.sha256()
    try:
        with open_input(path, "file to hash") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    except OSError as exc:
        raise SourceError(f"cannot hash {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def describe_files(files: Iterable[Path | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """[{name, bytes, sha256}] for each file; an item that is already such a mapping (a shard
    streamed from the Hub and no longer on disk: `Checkpoint.describe_shards`) is kept."""
    return [
        dict(p)
        if isinstance(p, Mapping)
        else {"name": p.name, "bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in files
    ]


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape the output (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def build_manifest(
    *,
    kind: str,
    method: str,
    source: str,
    source_files: Iterable[Path | Mapping[str, Any]],
    options: dict[str, Any],
    plan: dict[str, Any],
    matrices: dict[str, dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest as a JSON-safe dict (see module docstring)."""
    manifest = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "method": method,
        "source": source,
        "source_files": describe_files(source_files),
        "options": options,
        "plan": plan,
        "matrices": matrices,
        "versions": versions(),
    }
    manifest.update(extra or {})
    return json_safe(manifest)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a spectra output folder; SourceError if absent, unreadable or not a JSON
    object."""
    path = folder / MANIFEST_NAME
    if not path.exists():
        raise SourceError(f"{str(folder)!r} has no {MANIFEST_NAME}: is it a spectra init output?")
    manifest = read_json_input(path, "manifest")
    if not isinstance(manifest, dict):
        raise SourceError(
            f"{path}: a spectra manifest is a JSON object, got {type(manifest).__name__}"
        )
    return manifest
