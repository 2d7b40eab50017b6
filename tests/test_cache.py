"""Spectrum cache: round trips, corruption detection, concurrent writes, shard digest memo."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

import spectra.linalg.cache as cache_mod
from spectra.blobcache import default_cache_dir
from spectra.errors import CacheError
from spectra.linalg.cache import (
    CacheCorruptionWarning,
    SpectrumCache,
)
from spectra.linalg.spectrum import Spectrum
from spectra.sources import reader
from spectra.sources.reader import ShardDigest


def _spectrum(seed: int = 0, vectors: bool = True) -> Spectrum:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(12, 8, generator=gen)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return Spectrum(
        values=S.double()[:4],
        U=U[:, :4] if vectors else None,
        Vh=Vh[:4] if vectors else None,
        method="rsvd-krylov",
        params={"k": 4, "seed": seed, "tol": 1e-5},
        residual=3.5e-4,
        shape=(12, 8),
        converged=True,
        iterations=5,
    )


def test_round_trip_keeps_tensors_and_facts(tmp_path: Path) -> None:
    cache = SpectrumCache(tmp_path)
    key = cache.entry_key("abc:0:384:F32:12x8", {"mode": "topk", "k": 4})
    assert not cache.contains(key) and cache.get(key) is None
    spec = _spectrum()
    cache.put(key, spec)
    got = cache.get(key)
    assert got is not None and got.from_cache
    assert torch.equal(got.values, spec.values) and torch.equal(got.U, spec.U)
    assert torch.equal(got.Vh, spec.Vh) and got.U.dtype == torch.float32
    assert got.to_dict() == spec.to_dict()
    assert not list(tmp_path.rglob(".tmp-*"))  # no temp files left behind
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.pt"))


def _column_major_u(m: int = 53, k: int = 7) -> Spectrum:
    """A Spectrum whose U is column-major (as compare's QR buffer) and whose Vh is a strided
    slice: neither is contiguous, so the writer has to copy rows block by block."""
    g = torch.Generator().manual_seed(3)
    U = torch.randn(k, m, generator=g, dtype=torch.float64).mT  # (m, k), column-major
    Vh = torch.randn(k, 2 * m, generator=g)[:, ::2]  # (k, m), float32, stride 2
    assert not U.is_contiguous() and not Vh.is_contiguous()
    values = torch.linspace(5, 1, k, dtype=torch.float64)
    return Spectrum(values, U, Vh, "gram64", shape=(m, m))


@pytest.mark.parametrize("block", [8, 24, 8 * 7 * 5 + 3, 1 << 20])
def test_streamed_payload_round_trips_bit_for_bit_in_any_block_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    """put streams each tensor in row blocks and get reads blocks into preallocated tensors
    (one row per block when a row is larger than the block, several rows otherwise, one block
    for all): the tensors come back equal, row-major, in their dtype; the payload is a plain
    safetensors file the reference reader reads to the same tensors, whose sha256 is the one
    in the metadata."""
    monkeypatch.setattr(cache_mod, "PAYLOAD_BLOCK_BYTES", block)
    cache = SpectrumCache(tmp_path, on_corrupt=pytest.fail)
    spec = _column_major_u()
    cache.put("e" * 64, spec)
    got = cache.get("e" * 64)
    assert got is not None and got.U.is_contiguous() and got.Vh.is_contiguous()
    for name in ("values", "U", "Vh"):
        a, b = getattr(got, name), getattr(spec, name)
        assert a.dtype == b.dtype and torch.equal(a, b)
    payload = next(tmp_path.rglob("*.safetensors"))
    ref = load_file(str(payload))
    assert set(ref) == {"values", "U", "Vh"} and torch.equal(ref["U"], spec.U)
    meta = json.loads(next(tmp_path.rglob("*.json")).read_text())
    assert meta["sha256"] == hashlib.sha256(payload.read_bytes()).hexdigest()
    assert payload.name == f"{'e' * 64}.{meta['sha256'][:16]}.safetensors"


def test_entries_written_whole_by_safetensors_still_read(tmp_path: Path) -> None:
    """The format is unchanged: an entry whose payload is `safetensors.torch.save`'s bytes (how
    every entry was written before streaming) reads back with its tensors."""
    cache = SpectrumCache(tmp_path, on_corrupt=pytest.fail)
    spec = _column_major_u()
    cache.put("f" * 64, spec)
    meta_path = next(tmp_path.rglob("*.json"))
    meta = json.loads(meta_path.read_text())
    next(tmp_path.rglob("*.safetensors")).unlink()
    old = save({n: getattr(spec, n).contiguous() for n in ("values", "U", "Vh")})
    digest = hashlib.sha256(old).hexdigest()
    meta.update(sha256=digest, payload=f"{'f' * 64}.{digest[:16]}.safetensors")
    meta["meta_sha256"] = cache_mod._meta_digest(meta)
    (meta_path.parent / meta["payload"]).write_bytes(old)
    meta_path.write_text(json.dumps(meta))
    got = cache.get("f" * 64)
    assert got is not None
    assert all(torch.equal(getattr(got, n), getattr(spec, n)) for n in ("values", "U", "Vh"))


@pytest.mark.parametrize("damage", ["flip_late_block", "header_length", "header_json", "append"])
def test_streamed_reads_detect_damage_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    """A flipped byte in a late block, a header length past the file, a malformed header, and
    bytes appended after the tensors: each is a corrupt entry (reported, removed, a miss)."""
    monkeypatch.setattr(cache_mod, "PAYLOAD_BLOCK_BYTES", 64)
    messages: list[str] = []
    cache = SpectrumCache(tmp_path, on_corrupt=messages.append)
    cache.put("d" * 64, _column_major_u())
    payload = next(tmp_path.rglob("*.safetensors"))
    data = bytearray(payload.read_bytes())
    if damage == "flip_late_block":
        data[-100] ^= 0x10
    elif damage == "header_length":
        data[:8] = (len(data) * 2).to_bytes(8, "little")
    elif damage == "header_json":
        data[8] = ord("[")
    else:
        data += b"\0" * 8
    payload.write_bytes(bytes(data))
    assert cache.get("d" * 64) is None
    assert len(messages) == 1 and "recomputing" in messages[0]
    assert not cache.contains("d" * 64) and not list(tmp_path.rglob("*.safetensors"))


def test_keys_depend_on_content_params_and_format() -> None:
    k = SpectrumCache.entry_key
    base = k("c1", {"mode": "values", "route": "gram64"})
    assert base == k("c1", {"route": "gram64", "mode": "values"})  # order-insensitive
    assert base != k("c2", {"mode": "values", "route": "gram64"})
    assert base != k("c1", {"mode": "values", "route": "svdvals"})
    assert len(base) == 64


def test_failed_spectra_are_not_stored(tmp_path: Path) -> None:
    cache = SpectrumCache(tmp_path)
    cache.put("f" * 64, Spectrum.failed((3, 3), "nan"))
    assert not cache.contains("f" * 64)


@pytest.mark.parametrize("damage", ["flip", "truncate_payload", "truncate_json", "drop_payload"])
def test_corruption_is_reported_removed_and_a_miss(tmp_path: Path, damage: str) -> None:
    messages: list[str] = []
    cache = SpectrumCache(tmp_path, on_corrupt=messages.append)
    key = cache.entry_key("x", {"mode": "values"})
    cache.put(key, _spectrum())
    payload = next(tmp_path.rglob("*.safetensors"))
    meta = next(tmp_path.rglob(f"{key}.json"))
    if damage == "flip":
        data = bytearray(payload.read_bytes())
        data[len(data) // 2] ^= 0x01
        payload.write_bytes(bytes(data))
    elif damage == "truncate_payload":
        payload.write_bytes(payload.read_bytes()[:40])
    elif damage == "truncate_json":
        meta.write_text(meta.read_text()[:25])
    else:
        payload.unlink()
    assert cache.get(key) is None
    assert len(messages) == 1 and key in messages[0] and "recomputing" in messages[0]
    assert not cache.contains(key)
    cache.put(key, _spectrum())  # recomputed result stores again
    assert cache.get(key) is not None


def test_corruption_warns_by_default(tmp_path: Path) -> None:
    cache = SpectrumCache(tmp_path)
    cache.put("a" * 64, _spectrum())
    meta = next(tmp_path.rglob("*.json"))
    doc = json.loads(meta.read_text())
    doc["sha256"] = "0" * 64
    meta.write_text(json.dumps(doc))
    with pytest.warns(CacheCorruptionWarning, match="checksum mismatch"):
        assert cache.get("a" * 64) is None


def test_concurrent_writers_of_one_entry_leave_a_valid_entry(tmp_path: Path) -> None:
    key = "b" * 64
    errors: list[BaseException] = []

    def write(seed: int) -> None:
        try:
            for _ in range(10):
                SpectrumCache(tmp_path).put(key, _spectrum(seed))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    got = SpectrumCache(tmp_path, on_corrupt=pytest.fail).get(key)
    assert got is not None
    assert any(torch.equal(got.values, _spectrum(s).values) for s in range(4))


def test_separate_processes_share_entries(tmp_path: Path) -> None:
    code = (
        "import sys, torch; from spectra.linalg.cache import SpectrumCache;"
        "from spectra.linalg.spectrum import Spectrum;"
        "c = SpectrumCache(sys.argv[1]);"
        "c.put('c' * 64, Spectrum(torch.arange(3, dtype=torch.float64), None, None, 'gram64',"
        " shape=(3, 3)))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)]) for _ in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    got = SpectrumCache(tmp_path).get("c" * 64)
    assert got is not None and got.values.tolist() == [0.0, 1.0, 2.0]


def test_shard_digest_memo_persists_and_notices_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reader, "RACY_NS", -(10**12))  # settled at once, as an old file is
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"0123456789")
    calls: list[Path] = []

    def compute(p: Path) -> ShardDigest:
        calls.append(p)
        record = reader.hash_shard(p)
        return replace(record, sha256=f"digest-{p.read_bytes().decode()}")

    root = tmp_path / "cache"
    assert SpectrumCache(root).shard_record(shard, compute).sha256 == "digest-0123456789"
    assert SpectrumCache(root).shard_record(shard, compute).sha256 == "digest-0123456789"
    assert len(calls) == 1  # a new cache object (a second run) reads the memo, not the shard
    shard.write_bytes(b"abcdefghijk")
    os.utime(shard, ns=(1, 1))
    assert SpectrumCache(root).shard_record(shard, compute).sha256 == "digest-abcdefghijk"
    assert len(calls) == 2


def test_default_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPECTRA_CACHE_DIR", str(tmp_path / "a"))
    assert default_cache_dir() == tmp_path / "a"
    assert SpectrumCache().root == tmp_path / "a"
    monkeypatch.delenv("SPECTRA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "spectra"


def test_unwritable_root_is_a_cache_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = SpectrumCache(blocker / "cache")
    with pytest.raises(CacheError, match="--no-cache"):
        cache.put("d" * 64, _spectrum())
