"""The blob store of derived outputs (plots, analyses) is bounded (issue 19): least recently used
blobs go first, the run in progress keeps its own, and the bound is configurable."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _source_fixtures import write_llama_like

from spectra.blobcache import DEFAULT_MAX_MB, MAX_MB_ENV, STALE_TMP_S, BlobCache, blob_key
from spectra.errors import ValidationError

BODY = 400_000  # bytes of each blob: 7 of them exceed a 2 MiB bound

# an earlier run: another process stores blobs ("ns:name") or reads them ("get:ns:name"), so
# this process has not used them
_EARLIER_RUN = """
import sys
from spectra.blobcache import BlobCache, blob_key
root, size = sys.argv[1], int(sys.argv[2])
for arg in sys.argv[3:]:
    *get, namespace, name = arg.split(":")
    cache = BlobCache(root, namespace, max_mb=1024)
    if get:
        assert cache.get(blob_key(name)) is not None
    else:
        cache.put(blob_key(name), name.encode() * (size // len(name)))
"""


def _earlier_run(root: Path, *blobs: str, size: int = BODY) -> None:
    argv = [sys.executable, "-c", _EARLIER_RUN, str(root), str(size), *blobs]
    subprocess.run(argv, check=True, timeout=120)


def _path(root: Path, namespace: str, name: str) -> Path:
    key = blob_key(name)
    return root / "blobs" / "v1" / namespace / key[:2] / f"{key}.bin"


def _age(path: Path, seconds_ago: float) -> None:
    then = time.time() - seconds_ago
    os.utime(path, (then, then))


def _stored(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (root / "blobs").rglob("*.bin")}


def test_least_recently_used_blobs_go_first_across_namespaces(tmp_path: Path) -> None:
    names = [f"old{i}" for i in range(6)]
    _earlier_run(tmp_path, "analysis:old0", *(f"plots:{n}" for n in names[1:]))
    for i, name in enumerate(names):  # old0 used longest ago ... old5 most recently
        _age(_path(tmp_path, "analysis" if i == 0 else "plots", name), 1000 - 100 * i)
    cache = BlobCache(tmp_path, "plots", max_mb=2)
    assert cache.get(blob_key("old1")) is not None  # used now: the most recently used
    cache.put(blob_key("new"), b"n" * BODY)  # 7 blobs of ~400 KB > 2 MiB: trimmed to 90%
    kept = {
        n
        for n in [*names, "new"]
        if any(_path(tmp_path, ns, n).exists() for ns in ("plots", "analysis"))
    }
    # oldest first: old0 (another namespace), old2, old3 go; 4 blobs = 1.6 MB <= 0.9 * 2 MiB
    assert kept == {"old1", "old4", "old5", "new"}
    assert sum(_stored(tmp_path).values()) <= 0.9 * (2 << 20)
    assert cache.get(blob_key("new")) == b"n" * BODY


def test_a_read_counts_as_a_use(tmp_path: Path) -> None:
    # written, read, then the other one written, then read again: the second read is the last
    # use (a relatime or noatime mount would leave the access time at the first read: the
    # store sets it)
    _earlier_run(tmp_path, "plots:read", "get:plots:read", "plots:unread", "get:plots:read")
    BlobCache(tmp_path, "plots", max_mb=1).put(blob_key("new"), b"n" * BODY)
    assert _path(tmp_path, "plots", "read").exists()
    assert not _path(tmp_path, "plots", "unread").exists()


def test_the_run_in_progress_keeps_its_blobs_whatever_the_bound(tmp_path: Path) -> None:
    _earlier_run(tmp_path, "plots:a", "plots:b")
    cache = BlobCache(tmp_path, "plots", max_mb=0)  # keep nothing but the run in progress
    mine = [blob_key(f"mine{i}") for i in range(3)]
    for i, key in enumerate(mine):
        cache.put(key, bytes([i]) * BODY)
    assert not _path(tmp_path, "plots", "a").exists()
    assert not _path(tmp_path, "plots", "b").exists()
    assert [cache.get(k) for k in mine] == [bytes([i]) * BODY for i in range(3)]
    # another cache object of the same process (the analysis of the same run) keeps them too
    BlobCache(tmp_path, "analysis", max_mb=0).put(blob_key("x"), b"x")
    assert all(cache.get(k) is not None for k in mine)


def test_stale_temporary_files_are_removed_fresh_ones_kept(tmp_path: Path) -> None:
    folder = tmp_path / "blobs" / "v1" / "plots" / "ab"
    folder.mkdir(parents=True)
    stale, fresh = folder / ".tmp-stale.bin", folder / ".tmp-fresh.bin"
    stale.write_bytes(b"s" * 10)
    fresh.write_bytes(b"f" * 10)
    _age(stale, STALE_TMP_S + 60)
    _earlier_run(tmp_path, "plots:old", size=3 << 20)  # over a 1 MiB bound
    BlobCache(tmp_path, "plots", max_mb=1).put(blob_key("new"), b"new")
    assert not stale.exists() and fresh.exists()  # a writer may still be renaming the fresh one
    assert not _path(tmp_path, "plots", "old").exists()


def test_the_bound_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MAX_MB_ENV, raising=False)
    assert BlobCache(tmp_path, "plots").max_bytes == DEFAULT_MAX_MB << 20
    monkeypatch.setenv(MAX_MB_ENV, "3")
    assert BlobCache(tmp_path, "plots").max_bytes == 3 << 20
    assert BlobCache(tmp_path, "plots", max_mb=5).max_bytes == 5 << 20  # the argument wins
    for bad in ("-1", "1.5", "lots"):
        monkeypatch.setenv(MAX_MB_ENV, bad)
        with pytest.raises(ValidationError, match=f"{MAX_MB_ENV}='{bad}'.*whole number of MiB"):
            BlobCache(tmp_path, "plots")


def test_report_keeps_its_own_outputs_under_a_tiny_bound(tmp_path: Path) -> None:
    """Through the command: with SPECTRA_BLOB_CACHE_MB=0 each run keeps exactly its own plots
    and analysis, the earlier run's are evicted, and the report is whole."""
    cache = tmp_path / "cache"
    env = {**os.environ, MAX_MB_ENV: "0", "OMP_NUM_THREADS": "1"}
    runs = {}
    for name in ("a", "b"):
        src = write_llama_like(
            tmp_path / name, layers=1, hidden=32, intermediate=48, vocab=40 + len(runs)
        )
        before = set(_stored(cache)) if (cache / "blobs").exists() else set()
        argv = [
            sys.executable,
            "-m",
            "spectra",
            "report",
            str(src),
            "--out",
            str(tmp_path / f"r{name}"),
        ]
        proc = subprocess.run(
            [*argv, "--cache-dir", str(cache), "-q"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
        runs[name] = set(_stored(cache)) - before
        assert len(list((tmp_path / f"r{name}" / "plots").glob("*.png"))) >= 5
    assert runs["a"] and runs["b"] and not runs["a"] & runs["b"]
    assert set(_stored(cache)) == runs["b"]  # a's blobs evicted by b's run, b's all kept
