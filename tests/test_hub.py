"""Hub repo ids with no network: a fake local Hub cache (offline) and a fake remote (streaming)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from _source_fixtures import llama_tensors, write_llama_like, write_safetensors
from huggingface_hub import constants as hf_constants
from safetensors.torch import load_file

from spectra.errors import HubError, SourceError
from spectra.sources.checkpoint import Checkpoint
from spectra.sources.hub import (
    RemoteFile,
    RemoteRepo,
    StreamingStore,
    cached_snapshot,
    looks_like_repo_id,
    split_repo_id,
    streaming_shards,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def stream_checkpoint(source: str, remote: RemoteRepo, *, disk_budget: int) -> Checkpoint:
    """A Checkpoint over a remote repo streamed within `disk_budget` (no network: fake remotes)."""
    return Checkpoint.from_shards(streaming_shards(source, remote, disk_budget=disk_budget))


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def build_fake_cache(cache: Path, repo_id: str, source: Path, *, commit: str = COMMIT) -> Path:
    """Lay `source`'s files out as huggingface-hub does: sha256-named blobs, snapshot symlinks."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / sha)
        os.symlink(Path("..") / ".." / "blobs" / sha, snap / f.name)
    return snap


def use_hub_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """Point huggingface_hub (so spectra) at `cache`: its constant was resolved at its import from
    HF_HUB_CACHE (tests/test_hub_cache_location.py checks that from fresh processes)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-cache"
    use_hub_cache(monkeypatch, cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return cache


def test_repo_id_parsing() -> None:
    assert looks_like_repo_id("org/name") and looks_like_repo_id("org/name@v1.0")
    assert not looks_like_repo_id("./org/name")
    assert not looks_like_repo_id("a/b/c") and not looks_like_repo_id("x/model.safetensors")
    assert split_repo_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    assert split_repo_id("org/name") == ("org/name", None)


def test_offline_cache_opens_and_reads(tmp_path: Path, offline_cache: Path) -> None:
    src = write_llama_like(tmp_path / "src", shards=2)
    snap = build_fake_cache(offline_cache, "org/tiny", src)
    with Checkpoint.open("org/tiny") as ckpt:
        assert ckpt.source == "org/tiny"
        assert [p.parent for p in ckpt.files] == [snap, snap]
        q = ckpt.matrices(roles=["q"])[0]
        ref = load_file(str(src / q.tensor.shard.name))[q.tensor.name]
        assert torch.equal(ckpt.read(q), ref.float())
        blob = q.tensor.shard.resolve().name
        assert ckpt.content_key(q).split(":")[0] == blob
        assert blob == hashlib.sha256(q.tensor.shard.read_bytes()).hexdigest()
    for spec, kwargs in [(f"org/tiny@{COMMIT}", {}), ("org/tiny", {"revision": "main"})]:
        with Checkpoint.open(spec, **kwargs) as ckpt:
            assert len(ckpt.matrices()) == 16


def test_offline_not_cached_is_a_clear_error(offline_cache: Path) -> None:
    with pytest.raises(HubError, match=r"org/absent: not in the local Hub cache .*HF_HUB_OFFLINE"):
        Checkpoint.open("org/absent")
    build_fake_cache(offline_cache, "org/x", write_llama_like(offline_cache.parent / "s"))
    with pytest.raises(HubError, match=r"org/x@v2: not in the local Hub cache"):
        Checkpoint.open("org/x@v2")


def test_local_only_without_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "c"
    use_hub_cache(monkeypatch, cache)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    build_fake_cache(cache, "org/tiny", write_llama_like(tmp_path / "src"))
    with Checkpoint.open("org/tiny", local_only=True) as ckpt:
        assert len(ckpt.files) == 2


def test_cached_snapshot_with_only_pickles(tmp_path: Path, offline_cache: Path) -> None:
    src = tmp_path / "pk"
    src.mkdir()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    build_fake_cache(offline_cache, "org/old", src)
    with pytest.raises(HubError, match=r"org/old: .*only pickled weights.*never unpickles"):
        Checkpoint.open("org/old")


def test_existing_local_path_wins_over_repo_id(tmp_path: Path, offline_cache: Path) -> None:
    write_llama_like(tmp_path / "org" / "local", shards=1)
    with Checkpoint.open("org/local") as ckpt:
        assert ckpt.files == [Path("org/local/model-00001-of-00001.safetensors")]


class FakeRemote:
    """A remote repo backed by a local folder; downloads copy into a fake cache layout."""

    def __init__(self, folder: Path, cache: Path, repo_id: str = "org/stream") -> None:
        self.repo_id, self.folder, self.cache = repo_id, folder, cache
        self.ranged: list[tuple[str, int, int]] = []

    def list_files(self) -> list[RemoteFile]:
        return [
            RemoteFile(p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(self.folder.iterdir())
        ]

    def read_bytes(self, name: str, start: int, length: int) -> bytes:
        self.ranged.append((name, start, length))
        with (self.folder / name).open("rb") as fh:
            fh.seek(start)
            return fh.read(length)

    def local_path(self, name: str) -> Path:
        return self.cache / "snapshots" / COMMIT / name

    def download(self, name: str) -> Path:
        target = self.local_path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.folder / name, target)
        return target


def test_streaming_downloads_one_shard_at_a_time_and_drops_it(tmp_path: Path) -> None:
    src = write_llama_like(tmp_path / "src", shards=3)
    remote = FakeRemote(src, tmp_path / "cache")
    largest = max(p.stat().st_size for p in src.glob("*.safetensors"))
    ckpt = stream_checkpoint("org/stream", remote, disk_budget=largest)  # room for one shard
    # Listing fetched headers only: every ranged read is inside a header.
    for name, start, length in remote.ranged:
        if name.endswith(".safetensors"):
            hlen = int.from_bytes((src / name).read_bytes()[:8], "little")
            assert start + length <= 8 + hlen
    store = ckpt._store
    assert isinstance(store, StreamingStore)
    reference = {**{k: v for f in src.glob("*.safetensors") for k, v in load_file(str(f)).items()}}
    seen_on_disk: list[list[str]] = []
    for m, w in ckpt.read_many(ckpt.matrices()):
        assert torch.equal(w, reference[m.tensor.name].float())
        seen_on_disk.append(sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors")))
    assert store.downloads == [p.name for p in ckpt.files]  # each shard once, in order
    assert all(len(names) == 1 for names in seen_on_disk)  # never two shards at once
    first = ckpt.matrices()[0]
    digest = ckpt.content_key(first).split(":")[0]
    assert digest == hashlib.sha256((src / first.tensor.shard.name).read_bytes()).hexdigest()
    ckpt.close()
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # dropped when closed


def test_streaming_keeps_what_fits_and_evicts_the_oldest(tmp_path: Path) -> None:
    """Shards stay on disk while they fit the budget, so a second read of a held shard downloads
    nothing; past the budget the least recently used one is deleted (before the fix each read
    pass downloaded every shard it touched again)."""
    src = write_llama_like(tmp_path / "src", shards=3)
    remote = FakeRemote(src, tmp_path / "cache")
    sizes = sorted(p.stat().st_size for p in src.glob("*.safetensors"))
    ckpt = stream_checkpoint("org/stream", remote, disk_budget=sizes[-1] + sizes[-2])
    store = ckpt._store
    assert isinstance(store, StreamingStore)
    assert store.windows(ckpt.files) == [ckpt.files[:2], ckpt.files[2:]]
    groups = ckpt.read_groups(ckpt.matrices())
    assert [len(g) for g in groups] and sum(len(g) for g in groups) == len(ckpt.matrices())
    by_file = [{ckpt.matrices()[i].tensor.shard for i in g} for g in groups]
    assert by_file == [set(ckpt.files[:2]), {ckpt.files[2]}]
    first, second, third = ckpt.files
    for shard in (first, second, first, second):
        ckpt.read(next(m for m in ckpt.matrices() if m.tensor.shard == shard))
    assert store.downloads == [first.name, second.name]  # held shards are read again for free
    ckpt.read(next(m for m in ckpt.matrices() if m.tensor.shard == third))
    assert store.downloads == [first.name, second.name, third.name]
    on_disk = {p.name for p in (tmp_path / "cache").rglob("*.safetensors")}
    assert on_disk == {second.name, third.name}  # the least recently used one went
    assert store.peak <= sizes[-1] + sizes[-2]
    ckpt.close()
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_orphaned_partial_downloads_are_reclaimed_or_counted(tmp_path: Path) -> None:
    """A partial file left by a killed download is deleted before the budget is planned; one a
    live download holds the lock of is counted against the budget."""
    src = write_llama_like(tmp_path / "src", shards=2)
    cache = tmp_path / "hub" / "models--org--stream"
    remote = FakeRemote(src, cache)
    blobs = cache / "blobs"
    blobs.mkdir(parents=True)
    orphan = blobs / f"{'a' * 64}.0badc0de.incomplete"
    orphan.write_bytes(b"x" * 5000)
    live = blobs / f"{'b' * 64}.12345678.incomplete"
    live.write_bytes(b"y" * 7000)
    locks = tmp_path / "hub" / ".locks" / "models--org--stream"
    locks.mkdir(parents=True)
    (locks / f"{'a' * 64}.lock").touch()  # a lock file nobody holds
    from filelock import FileLock

    largest = max(p.stat().st_size for p in src.glob("*.safetensors"))
    with FileLock(str(locks / f"{'b' * 64}.lock")):
        ckpt = stream_checkpoint("org/stream", remote, disk_budget=largest + 6999)
        store = ckpt._store
        assert isinstance(store, StreamingStore)
        assert not orphan.exists() and live.exists()
        in_largest = next(
            m for m in ckpt.matrices() if (src / m.tensor.shard.name).stat().st_size == largest
        )
        with pytest.raises(HubError, match=r"do not fit the disk budget .* 7000 bytes of other"):
            ckpt.read(in_largest)
        ckpt = stream_checkpoint("org/stream", remote, disk_budget=largest + 7000)
        ckpt.read(in_largest)
        ckpt.close()
    assert not list(blobs.glob("*.safetensors"))


def test_streaming_budget_too_small(tmp_path: Path) -> None:
    """Refused when opened, before any download (not after other shards were downloaded), with
    the largest shard named and its size."""
    src = write_llama_like(tmp_path / "src", shards=2)
    remote = FakeRemote(src, tmp_path / "cache")
    largest = max(src.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    size = largest.stat().st_size
    message = rf"org/stream/{largest.name}: shard is {size} bytes .* budget of 1000 bytes"
    with pytest.raises(HubError, match=message):
        stream_checkpoint("org/stream", remote, disk_budget=1000)
    assert [n for n, _, _ in remote.ranged if n.endswith(".safetensors")] == []  # no header read
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_streaming_refuses_index_outside_and_pickles(tmp_path: Path) -> None:
    src = write_llama_like(tmp_path / "src", shards=1)
    index = src / "model.safetensors.index.json"
    body = json.loads(index.read_text())
    body["weight_map"]["model.norm.weight"] = "../../secret.safetensors"
    index.write_text(json.dumps(body))
    with pytest.raises(SourceError, match=r"outside the checkpoint folder; refusing"):
        stream_checkpoint("org/stream", FakeRemote(src, tmp_path / "c"), disk_budget=10**9)
    pk = tmp_path / "pk"
    pk.mkdir()
    (pk / "pytorch_model.bin").write_bytes(b"junk")
    with pytest.raises(HubError, match=r"only pickled weights"):
        stream_checkpoint("org/pk", FakeRemote(pk, tmp_path / "c2"), disk_budget=10**9)


def test_streaming_keeps_shards_already_cached(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_safetensors(src / "model.safetensors", llama_tensors(layers=1))
    remote = FakeRemote(src, tmp_path / "cache")
    remote.download("model.safetensors")  # already in the cache before the pass
    ckpt = stream_checkpoint("org/stream", remote, disk_budget=10**9)
    list(ckpt.read_many(ckpt.matrices()))
    assert ckpt._store.downloads == []  # type: ignore[attr-defined]
    assert remote.local_path("model.safetensors").is_file()


@pytest.mark.parametrize(
    "text", ["[" * 100_000, '{"weight_map": {"a": ' + "9" * 5000 + "}}"], ids=["deep", "long-int"]
)
def test_streaming_hostile_index_json_is_a_hub_error(tmp_path: Path, text: str) -> None:
    src = write_llama_like(tmp_path / "src", shards=2)
    (src / "model.safetensors.index.json").write_text(text)
    with pytest.raises(HubError, match=r"invalid JSON"):
        stream_checkpoint("org/stream", FakeRemote(src, tmp_path / "c"), disk_budget=10**9)


def test_absolute_revision_never_reads_outside_the_cache(
    tmp_path: Path, offline_cache: Path
) -> None:
    build_fake_cache(offline_cache, "org/tiny", write_llama_like(tmp_path / "src"))
    outside = tmp_path / "ref-outside"
    outside.write_text(COMMIT)  # before the fix this outside file was read as the ref
    assert cached_snapshot("org/tiny", str(outside), offline_cache) is None
    assert cached_snapshot("org/tiny", "main", offline_cache) is not None
