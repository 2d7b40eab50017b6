"""The spectrum cache is keyed by content: a cached spectrum always belongs to the bytes it was
computed from (issue 14, case 5).

Shard digests are remembered by file identity (device, inode, size, mtime_ns, ctime_ns) and a
spectrum is stored only after its shard is confirmed unchanged since its digest was taken; a Hub
blob's name is not trusted. `RACY_NS` is patched to a large negative value in the "settled" runs,
so every digest counts as settled at once, as for a file written long before the run: then the
identity alone decides, which is the case a stale (path, size, mtime) memo got wrong.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from _linalg_fixtures import one_thread  # noqa: F401  (fixture)
from _source_fixtures import llama_tensors
from safetensors.torch import save_file

from spectra.errors import SourceError
from spectra.linalg.cache import SpectrumCache
from spectra.linalg.decompose import SpectrumOptions
from spectra.linalg.engine import EngineOptions, compute_spectra
from spectra.linalg.spectrum import Spectrum
from spectra.sources import reader
from spectra.sources.checkpoint import Checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["settled", "racy"])
def timing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """settled: digests are trusted on identity (an old file); racy: the real 2 s rule, so the
    test's just-written files are re-hashed wherever they are used."""
    if request.param == "settled":
        monkeypatch.setattr(reader, "RACY_NS", -(10**15))
    return str(request.param)


def _write(path: Path, seed: int) -> bytes:
    save_file(llama_tensors(layers=2, seed=seed), str(path))
    return path.read_bytes()


def _run(
    folder: Path, cache: SpectrumCache, *, prefetch: bool = False, progress=None
) -> list[Spectrum]:
    with Checkpoint.open(folder) as ck:
        return list(
            compute_spectra(
                ck,
                options=SpectrumOptions(mode="values"),
                engine=EngineOptions(device="cpu", prefetch=prefetch),
                cache=cache,
                progress=progress,
            )
        )


def _fresh(folder: Path) -> dict[str, torch.Tensor]:
    """float64 singular values of every matrix, computed here from the bytes on disk."""
    with Checkpoint.open(folder) as ck:
        return {r.key: torch.linalg.svdvals(ck.read(r).double()) for r in ck.matrices()}


def _assert_fresh(specs: list[Spectrum], folder: Path) -> None:
    want = _fresh(folder)
    assert len(specs) == len(want) == 16
    wrong = [s.key for s in specs if not torch.allclose(s.values, want[s.key], rtol=1e-9)]
    assert wrong == [], f"{len(wrong)} of {len(specs)} spectra are not those of the file's bytes"


@pytest.mark.parametrize("how", ["rewrite+utime", "copy2"])
def test_same_size_replacement_keeping_the_mtime_is_recomputed(
    tmp_path: Path, timing: str, how: str
) -> None:
    model = tmp_path / "m"
    model.mkdir()
    shard = model / "model.safetensors"
    _write(shard, seed=0)
    old = os.stat(shard)
    first = _run(model, SpectrumCache(tmp_path / "cache"))
    _assert_fresh(first, model)
    if how == "rewrite+utime":  # what `cp -p` onto the file or `tar -x` leave behind
        _write(shard, seed=1)
        os.utime(shard, ns=(old.st_atime_ns, old.st_mtime_ns))
    else:  # shutil.copy2: writes into the existing file, then copies the source's mtime
        other = tmp_path / "other.safetensors"
        _write(other, seed=1)
        os.utime(other, ns=(old.st_atime_ns, old.st_mtime_ns))
        shutil.copy2(other, shard)
    new = os.stat(shard)
    assert (new.st_size, new.st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    again = _run(model, SpectrumCache(tmp_path / "cache"))  # a new run, the persistent memo
    _assert_fresh(again, model)
    assert not any(s.from_cache for s in again)


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_file_rewritten_during_a_run_never_caches_other_bytes_spectra(
    tmp_path: Path, timing: str, prefetch: bool
) -> None:
    model = tmp_path / "m"
    model.mkdir()
    shard = model / "model.safetensors"
    original = _write(shard, seed=0)
    replacement = _write(tmp_path / "other.safetensors", seed=1)
    assert len(replacement) == len(original)
    cache = SpectrumCache(tmp_path / "cache")

    def rewrite(done: int, total: int, nbytes: int) -> None:
        if done == 1:
            shard.write_bytes(replacement)

    raised = ""
    try:
        _run(model, cache, prefetch=prefetch, progress=rewrite)
    except SourceError as exc:
        raised = str(exc)
    shard.write_bytes(original)  # restored: same bytes as the first version
    again = _run(model, SpectrumCache(tmp_path / "cache"), prefetch=prefetch)
    _assert_fresh(again, model)
    assert re.search(r"changed while spectra was reading it \(.+\).*run again", raised)
    assert any(s.from_cache for s in again)  # what was read before the rewrite was kept


def test_a_repaired_hub_blob_gets_its_own_spectra(tmp_path: Path, timing: str) -> None:
    """A blob is named by the sha256 the Hub announced; a corrupted one keeps that name. Its
    spectra must not be served for the repaired bytes."""
    good = _write(tmp_path / "good.safetensors", seed=0)
    bad = _write(tmp_path / "bad.safetensors", seed=1)  # same size, other bytes
    sha = hashlib.sha256(good).hexdigest()
    repo = tmp_path / "hub" / "models--org--tiny"
    blob = repo / "blobs" / sha
    snap = repo / "snapshots" / ("a" * 40)
    blob.parent.mkdir(parents=True)
    snap.mkdir(parents=True)
    blob.write_bytes(bad)
    os.symlink(Path("..") / ".." / "blobs" / sha, snap / "model.safetensors")
    corrupt = _run(snap, SpectrumCache(tmp_path / "cache"))
    _assert_fresh(corrupt, snap)  # the bytes on disk, whatever their name says
    blob.write_bytes(good)  # repaired (a re-download)
    repaired = _run(snap, SpectrumCache(tmp_path / "cache"))
    _assert_fresh(repaired, snap)
    with Checkpoint.open(snap) as ck:
        assert ck.content_key(ck.matrices()[0]).split(":")[0] == sha


def test_compare_caches_the_base_only_for_the_bytes_it_read(
    tmp_path: Path, timing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compare's cached base U: a base rewritten right after one of its matrices was read is an
    error, never that matrix's U under the new bytes' digest; cached and uncached comparisons
    of either version agree afterwards."""
    from spectra.analysis.comparison import CompareOptions
    from spectra.jobs.compare import compare

    base, ft = tmp_path / "base", tmp_path / "ft"
    base.mkdir()
    ft.mkdir()
    shard = base / "model.safetensors"
    original = _write(shard, seed=0)
    replacement = _write(tmp_path / "other.safetensors", seed=1)
    _write(ft / "model.safetensors", seed=2)
    opts = CompareOptions(device="cpu")
    real_read = Checkpoint.read
    reads: list[str] = []

    def read_then_rewrite(self: Checkpoint, ref: object, **kw: object) -> torch.Tensor:
        out = real_read(self, ref, **kw)
        if Path(self.files[0]).parent == base:
            reads.append(str(ref))
            if len(reads) == 3:  # the third base matrix: read as A, the file is B from now on
                shard.write_bytes(replacement)
        return out

    monkeypatch.setattr(Checkpoint, "read", read_then_rewrite)
    raised = ""
    try:
        compare(base, ft, opts, cache=tmp_path / "cache")
    except SourceError as exc:
        raised = str(exc)
    monkeypatch.setattr(Checkpoint, "read", real_read)
    for version in (replacement, original):
        shard.write_bytes(version)
        cached = compare(base, ft, opts, cache=tmp_path / "cache")
        uncached = compare(base, ft, opts)
        assert cached is not None and uncached is not None
        assert cached.to_dict()["pairs"] == uncached.to_dict()["pairs"]
    assert "changed while spectra was reading it" in raised


def test_a_wrapped_checkpoint_is_keyed_by_its_own_content_key(tmp_path: Path) -> None:
    """A base with a LoRA adapter applied (MergedCheckpoint) and a shuffled view read other
    numbers from the same shard bytes: their spectra must not share the base's cache entries."""
    from _source_fixtures import write_llama_like, write_lora_adapter

    from spectra.analysis.randomized import ShuffledView
    from spectra.sources.adapters import LoraAdapter, MergedCheckpoint

    q0 = "model.layers.0.self_attn.q_proj.weight"
    base_dir = write_llama_like(tmp_path / "base", dtype=torch.float32)
    ad_dir = write_lora_adapter(tmp_path / "ad", {q0: (64, 64)}, r=4, alpha=8)
    cache = SpectrumCache(tmp_path / "cache")
    opts, engine = SpectrumOptions(mode="values"), EngineOptions(device="cpu")
    with Checkpoint.open(base_dir) as base, LoraAdapter.open(ad_dir) as ad:
        q = next(m for m in base.matrices() if m.key == q0)
        list(compute_spectra(base, [q], opts, engine=engine, cache=cache))  # the base, cached
        merged = MergedCheckpoint(base, ad)
        want = torch.linalg.svdvals(merged.read(q, dtype=torch.float64))
        for _ in range(2):  # computed, then from its own entry
            (got,) = compute_spectra(merged, [q], opts, engine=engine, cache=cache)
            assert torch.allclose(got.values, want, rtol=1e-9)
        view = ShuffledView(base, seed=3)
        ((_, shuffled),) = view.read_many([q], dtype=torch.float64)
        (got,) = compute_spectra(view, [q], opts, engine=engine, cache=cache)
        assert torch.allclose(got.values, torch.linalg.svdvals(shuffled), rtol=1e-9)
