"""A whole `analyze()` result kept with the spectra it was computed from, for cached reruns.

The spectrum cache makes a rerun skip the decompositions, but a rerun still paid for importing
torch (about 2 s of CPU, most of a cached `spectra report` on a small model) and for the fits.
This module keeps the finished `Analysis` (metrics, summary and eigenvalues) in the same cache
folder under a key made of
- every input file of a local source: its real path and identity (device, inode, size,
  mtime_ns, ctime_ns: the rule under which the spectrum cache reuses a shard digest, so any
  write, copy with kept times, replacement or `touch` misses),
- the caller's description of what is computed (every option that can change a number),
- the thread and device environment and the torch/numpy versions (numbers are bit-comparable
  only at equal thread counts and builds),
- `code_digest("spectra")`: the source of every spectra module, so an edit anywhere misses;
and reads it back without importing torch. Hub sources, sources that are not plain local files
and runs under torchrun (every rank must take the same path) are never served from here.

Format: one `BlobCache` blob ("analysis" namespace): a JSON header (lossless: NaN and inf are
kept, unlike metrics.json) with the eigenvalue array sizes, a newline, then the float64
eigenvalues back to back. Nothing is pickled; a blob that does not parse is a miss.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from spectra.analysis.results import (
    Analysis,
    GroupSummary,
    LayerMetrics,
    ModelSummary,
    MoeSummary,
    SkippedMatrix,
)
from spectra.blobcache import BlobCache, blob_key, code_digest

NAMESPACE = "analysis"
#: environment variables that change which numbers a run computes (threads, visible devices)
ENV_KEYS = (
    "SPECTRA_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "SPECTRA_DEVICE",
)
MAX_INPUT_FILES = 4096
_INPUT_SUFFIXES = (".safetensors", ".json")


def under_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """True when launched by torchrun with more than one process (no cached shortcut then:
    every rank must run the same collectives)."""
    env = os.environ if environ is None else environ
    try:
        return int(env.get("WORLD_SIZE", "1") or "1") > 1
    except ValueError:
        return True  # malformed: let the runtime's own check report it


def input_files(path: Path) -> list[Path] | None:
    """Every file an analysis of local `path` can read (a `.safetensors` file; or a folder's
    `.safetensors` and `.json` files, subfolders included), or None when `path` is not a plain
    local file or folder or holds more than MAX_INPUT_FILES of them (no shortcut then)."""
    try:
        if path.is_file():
            return [path]
        if not path.is_dir():
            return None
        found: list[Path] = []
        for folder, _dirs, names in os.walk(path, followlinks=True):
            for name in names:
                if name.endswith(_INPUT_SUFFIXES):
                    found.append(Path(folder) / name)
            if len(found) > MAX_INPUT_FILES:
                return None
        return sorted(found)
    except OSError:
        return None


def _identity(path: Path) -> list[Any] | None:
    st = os.stat(path)  # follows links: the identity of the bytes read
    if not (st.st_mode & 0o170000 == 0o100000):  # a regular file only
        return None
    return [
        os.path.realpath(path),
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
    ]


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def analysis_key(source: Path, computed: Mapping[str, Any]) -> str | None:
    """The cache key of analysing local `source` with `computed` (JSON-able: every option that
    can change a number), or None when there is no safe key (see `input_files`)."""
    files = input_files(source)
    if not files:
        return None
    try:
        identities = [_identity(f) for f in files]
    except OSError:
        return None
    if any(ident is None for ident in identities):
        return None
    return blob_key(
        NAMESPACE,
        code_digest("spectra"),
        str(source),
        identities,
        dict(computed),
        {k: os.environ.get(k) for k in ENV_KEYS},
        {p: _package_version(p) for p in ("torch", "numpy")},
    )


def encode_analysis(analysis: Analysis) -> bytes:
    """The blob: JSON header (every field, NaN/inf kept) + float64 eigenvalues."""
    keys = list(analysis.esds)
    arrays = [np.ascontiguousarray(analysis.esds[k], dtype="<f8") for k in keys]
    s = analysis.summary
    header = {
        "source": analysis.source,
        "options": analysis.options,
        "versions": analysis.versions,
        "layers": [asdict(lm) for lm in analysis.layers],
        "summary": {
            "num_matrices": s.num_matrices,
            "num_warned": s.num_warned,
            "warned_share": s.warned_share,
            "mean_alpha": s.mean_alpha,
            "by_role": {k: asdict(g) for k, g in s.by_role.items()},
            "by_depth": [[k, asdict(g)] for k, g in s.by_depth.items()],
            "standouts": s.standouts,
            "means": s.means,
        },
        "skipped": [asdict(sk) for sk in analysis.skipped],
        "esds": [[k, int(a.size)] for k, a in zip(keys, arrays, strict=True)],
    }
    if analysis.moe is not None:  # the mixture-of-experts view (JSON-safe: no NaN in it)
        header["moe"] = analysis.moe.to_dict()
    text = json.dumps(header, separators=(",", ":"), default=_json_default)
    return text.encode() + b"\n" + b"".join(a.tobytes() for a in arrays)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def decode_analysis(blob: bytes) -> Analysis:
    """Inverse of `encode_analysis` (ValueError/KeyError/TypeError on a malformed blob)."""
    head, sep, body = blob.partition(b"\n")
    if not sep:
        raise ValueError("no header line")
    h = json.loads(head)
    esds: dict[str, np.ndarray] = {}
    offset = 0
    for key, size in h["esds"]:
        end = offset + 8 * int(size)
        if end > len(body):
            raise ValueError("eigenvalues truncated")
        esds[str(key)] = np.frombuffer(body, dtype="<f8", count=int(size), offset=offset).copy()
        offset = end
    if offset != len(body):
        raise ValueError("trailing bytes after the eigenvalues")
    s = h["summary"]
    summary = ModelSummary(
        num_matrices=s["num_matrices"],
        num_warned=s["num_warned"],
        warned_share=s["warned_share"],
        mean_alpha=s["mean_alpha"],
        by_role={k: GroupSummary(**g) for k, g in s["by_role"].items()},
        by_depth={int(k): GroupSummary(**g) for k, g in s["by_depth"]},
        standouts=list(s["standouts"]),
        means=dict(s["means"]),
    )
    layers = []
    for d in h["layers"]:
        d = {**d, "shape": tuple(d["shape"]), "warnings": tuple(d["warnings"])}
        d["traps"] = tuple(d.get("traps") or ())
        layers.append(LayerMetrics(**d))
    return Analysis(
        source=h["source"],
        layers=layers,
        summary=summary,
        options=h["options"],
        esds=esds,
        versions=h["versions"],
        skipped=[
            SkippedMatrix(str(d["key"]), tuple(d["shape"]), str(d["reason"])) for d in h["skipped"]
        ],
        moe=MoeSummary.from_dict(h["moe"]) if h.get("moe") is not None else None,
    )


class AnalysisCache:
    """`Analysis` blobs under a cache root (the spectrum cache's folder by default)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.blobs = BlobCache(root, NAMESPACE)

    def get(self, key: str) -> Analysis | None:
        """The stored Analysis, or None when absent or unreadable."""
        blob = self.blobs.get(key)
        if blob is None:
            return None
        try:
            return decode_analysis(blob)
        except (ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, analysis: Analysis) -> None:
        self.blobs.put(key, encode_analysis(analysis))
