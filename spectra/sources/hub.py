"""Hub repo ids (`org/name`, `org/name@revision`): the local cache first, offline mode, and
shard-by-shard streaming under a disk budget.

Only `*.safetensors` and `*.json` files are ever fetched. Three ways in:

- offline (`HF_HUB_OFFLINE=1` or `local_only=True`): the cached snapshot
  `<HF_HUB_CACHE>/models--org--name/snapshots/<commit>/`, resolved through `refs/<revision>`;
  nothing touches the network. The cache folder is huggingface_hub's own (`hub_cache_dir`).
- online, no budget: `snapshot_download` of the safetensors and JSON files, then a local open.
- online with `disk_budget` (bytes): headers come from ranged reads; during a read pass each shard
  is downloaded when its turn comes, its tensors handed on, and the file deleted after the pass
  unless it was in the cache before. A shard larger than the budget is refused up front.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from huggingface_hub import constants as hf_constants

from spectra.errors import HubError, SourceError, ValidationError
from spectra.formats.files import open_input, read_text_input
from spectra.formats.safetensors import (
    INDEX_NAME,
    MAX_HEADER_BYTES,
    ShardHeader,
    clip,
    parse_header,
    read_header,
)
from spectra.sources.hub_client import STAMPS, hub_call, hub_timeout, verify_sha256
from spectra.sources.layout import (
    CONVERT_HINT,
    PICKLE_SUFFIXES,
    index_weight_map,
    local_layout,
    read_config,
)
from spectra.sources.reader import ShardStore, shard_digest

ALLOW_PATTERNS = ("*.safetensors", "*.json")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRUE = {"1", "true", "yes", "on"}
SIDE_FILE_LIMIT = 50_000_000  # bytes: a config or tokenizer file, never weights
HEADERS_ONLY = 1 << 62
"""A disk budget that refuses no shard: streaming mode for a caller that reads only headers
(`spectra inspect`), so opening a repo costs its headers' bytes, not a download of the model."""


def looks_like_repo_id(text: str) -> bool:
    """`org/name` or `org/name@rev` (and not something that reads as a file name)."""
    return bool(_REPO_ID.fullmatch(text)) and not text.endswith((".safetensors", ".json"))


def split_repo_id(text: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); no '@' -> (text, None)."""
    repo_id, _, revision = text.partition("@")
    return repo_id, revision or None


def is_offline(local_only: bool | None = None) -> bool:
    """`local_only` when given, else the HF_HUB_OFFLINE environment setting (read now)."""
    if local_only is not None:
        return local_only
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_cache_dir() -> Path:
    """The Hub cache folder, as huggingface_hub has it (`huggingface_hub.constants.HF_HUB_CACHE`).

    huggingface_hub resolves it once, when it is first imported: HF_HUB_CACHE, else the legacy
    HUGGINGFACE_HUB_CACHE, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
    `~/.cache/huggingface/hub`. Reading its constant (at call time, so a patched constant is
    followed too) keeps spectra's cache and every huggingface_hub download in one folder.
    """
    return Path(hf_constants.HF_HUB_CACHE)


def repo_folder(repo_id: str, cache_dir: Path | None = None) -> Path:
    """`<cache>/models--org--name`, named by huggingface_hub."""
    from huggingface_hub.file_download import repo_folder_name  # ~0.2 s of imports: Hub use only

    return (cache_dir or hub_cache_dir()) / repo_folder_name(repo_id=repo_id, repo_type="model")


def cached_snapshot(
    repo_id: str, revision: str | None, cache_dir: Path | None = None
) -> Path | None:
    """The cached snapshot folder of `repo_id` at `revision` (branch, tag or commit), or None."""
    folder = repo_folder(repo_id, cache_dir)
    rev = revision or "main"
    commit: str | None = rev if _COMMIT.fullmatch(rev) else None
    if commit is None:
        ref = folder / "refs" / rev
        if ".." in Path(rev).parts or Path(rev).is_absolute() or not ref.is_file():
            return None
        commit = read_text_input(ref, 4096, "Hub cache ref").strip()
    snap = folder / "snapshots" / commit
    return snap if _COMMIT.fullmatch(commit) and snap.is_dir() else None


@dataclass(frozen=True)
class RepoShards:
    """What a `Checkpoint` over a Hub repo is built from (`Checkpoint.from_shards`): the parsed
    shard headers, the store that opens the shards (None: local files, a cached snapshot), the
    repo's config.json and its index's weight map (None without an index)."""

    source: str
    headers: tuple[ShardHeader, ...]
    config: dict[str, object]
    weight_map: Mapping[str, Path] | None = None
    store: ShardStore | None = None
    commit: str | None = None  # the 40-hex commit the files were read at


def repo_shards(
    text: str,
    *,
    revision: str | None = None,
    local_only: bool | None = None,
    disk_budget: int | None = None,
) -> RepoShards:
    """The shards of Hub repo `text` (`org/name[@rev]`), headers parsed (see the module
    docstring for the three ways in). `Checkpoint.open` builds its Checkpoint from them."""
    repo_id, rev_in_text = split_repo_id(text)
    if revision and rev_in_text and revision != rev_in_text:
        raise ValidationError(f"{text}: revision given twice ({rev_in_text!r} and {revision!r})")
    rev = revision or rev_in_text
    if disk_budget is not None and disk_budget <= 0:
        raise ValidationError(f"disk_budget must be a positive number of bytes, got {disk_budget}")
    cache = hub_cache_dir()
    if is_offline(local_only):
        snap = cached_snapshot(repo_id, rev, cache)
        if snap is None:
            raise HubError(
                f"{text}: not in the local Hub cache ({cache}) and offline mode is on "
                "(HF_HUB_OFFLINE=1 or local_only): download it once online, e.g. "
                f"`hf download {repo_id}{' --revision ' + rev if rev else ''} "
                "--include '*.safetensors' --include '*.json'`, or unset "
                "HF_HUB_OFFLINE (no such local path either)"
            )
        return snapshot_shards(text, snap)
    remote = HubRemote(repo_id, rev, cache)
    if disk_budget is None:
        return snapshot_shards(text, remote.download_all())
    return streaming_shards(text, remote, disk_budget=disk_budget)


def snapshot_shards(source: str, snapshot: Path) -> RepoShards:
    """The shards of a snapshot folder (local files); the source keeps the repo id for messages,
    the commit is the snapshot folder's name."""
    try:
        layout = local_layout(snapshot)
    except SourceError as exc:
        raise HubError(f"{source}: {exc}") from exc
    stamps = snapshot.parent.parent / STAMPS if snapshot.parent.name == "snapshots" else None
    for shard in layout.shards:  # a blob named by its sha256 must hash to it (LFS files)
        blob = Path(os.path.realpath(shard))
        if blob.parent.name == "blobs" and _SHA256.fullmatch(blob.name):
            verify_sha256(f"{source}/{shard.name}", shard, blob.name, delete=False, stamps=stamps)
    headers = tuple(read_header(p) for p in layout.shards)
    commit = snapshot.name if _COMMIT.fullmatch(snapshot.name) else None
    config = read_config(layout.shards)
    return RepoShards(source, headers, config, layout.weight_map, commit=commit)


# -- streaming --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteFile:
    """A file of a remote repo: name (relative path), size in bytes, sha256 when LFS-tracked."""

    name: str
    size: int
    sha256: str | None = None


class RemoteRepo(Protocol):
    """What streaming needs from a remote repo. `HubRemote` is the huggingface-hub one."""

    repo_id: str

    def list_files(self) -> list[RemoteFile]: ...

    def read_bytes(self, name: str, start: int, length: int) -> bytes: ...

    def local_path(self, name: str) -> Path: ...

    def download(self, name: str) -> Path: ...


def streaming_shards(
    source: str, remote: RemoteRepo, *, disk_budget: int, keep: bool = False
) -> RepoShards:
    """Shards fetched during reads (headers fetched now, by ranged reads), within
    `disk_budget` bytes on disk (see `StreamingStore`); a shard larger than the budget is refused
    here, before anything is downloaded.

    Shards downloaded for a pass are deleted by `close()` unless `keep`; shards already on disk
    stay.
    A remote index's weight map is checked against the headers as for a local folder.
    """
    files = {f.name: f for f in remote.list_files()}
    names, index_map = _remote_names(source, remote, files)
    by_path = {remote.local_path(n): files[n] for n in names}
    missing = [info for path, info in by_path.items() if not path.is_file()]
    if missing:  # refused before any download (headers too), naming the largest shard
        check_fits(source, max(missing, key=lambda f: f.size), disk_budget)
    headers = [_remote_header(source, remote, info) for info in by_path.values()]
    config = _remote_json(remote, files.get("config.json"))  # used for the model width only
    store = StreamingStore(remote, by_path, budget=disk_budget, keep=keep)
    weight_map = None
    if index_map is not None:  # paths as the headers carry them, so the check compares equal
        weight_map = {tensor: remote.local_path(n) for tensor, n in index_map.items()}
    config = config if isinstance(config, dict) else {}
    commit = getattr(remote, "commit", None)
    return RepoShards(source, tuple(headers), config, weight_map, store, commit)


def _remote_names(
    source: str, remote: RemoteRepo, files: dict[str, RemoteFile]
) -> tuple[list[str], dict[str, str] | None]:
    """Shard names in reading order, and the index's weight map (None without an index)."""
    if INDEX_NAME in files:
        obj = _remote_json(remote, files[INDEX_NAME])
        weight_map = index_weight_map(obj, f"{source}/{INDEX_NAME}")
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if n not in files]
        if missing:
            raise HubError(
                f"{source}: the index names shard {clip(missing[0])}, which the repo lacks"
            )
        return names, weight_map
    names = sorted(n for n in files if n.endswith(".safetensors") and "/" not in n)
    if names:
        return names, None
    pickles = [n for n in files if n.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise HubError(
            f"{source}: only pickled weights ({pickles[0]}), no .safetensors; {CONVERT_HINT}"
        )
    raise HubError(f"{source}: the repo has no .safetensors files")


def _remote_json(remote: RemoteRepo, info: RemoteFile | None) -> object:
    if info is None or info.size > 50_000_000:
        return {}
    try:
        return json.loads(remote.read_bytes(info.name, 0, info.size).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HubError(f"{remote.repo_id}/{info.name}: invalid JSON ({exc})") from exc
    except (ValueError, RecursionError) as exc:  # a number too long, nesting too deep
        raise HubError(
            f"{remote.repo_id}/{info.name}: invalid JSON ({type(exc).__name__})"
        ) from exc


def _remote_header(source: str, remote: RemoteRepo, info: RemoteFile) -> ShardHeader:
    """A shard's header: from the cached file when there is one, else by two ranged reads
    (the 8-byte length, then exactly the header)."""
    label = f"{source}/{info.name}"
    local = remote.local_path(info.name)
    if local.is_file():
        return read_header(local)
    head = remote.read_bytes(info.name, 0, min(8, info.size)) if info.size else b""
    rest = b""
    if len(head) == 8:
        (hlen,) = struct.unpack("<Q", head)
        if hlen <= min(info.size - 8, MAX_HEADER_BYTES):
            rest = remote.read_bytes(info.name, 8, hlen)
    return parse_header(
        io.BytesIO(head + rest), info.size, remote.local_path(info.name), label=label
    )


class StreamingStore:
    """Fetches a shard when a read pass reaches it, keeps what it fetched while it fits the disk
    budget, and evicts the least recently used shard (not open) to make room for the next.

    Read shard by shard (`windows` says which shards to read together), every shard is downloaded
    once. The budget counts what this store holds, the shard being downloaded (its partial
    `.incomplete` file grows to the shard's size) and partial files other live downloads of the
    same repo are writing; partial files no live download owns (left by a killed run) are deleted
    first (`reclaim_partials`). Shards in the cache before the pass are neither counted nor
    deleted. `close()` deletes what this store downloaded, unless `keep`.
    """

    def __init__(
        self, remote: RemoteRepo, files: dict[Path, RemoteFile], *, budget: int, keep: bool
    ) -> None:
        self._remote, self._files, self._budget, self._keep = remote, files, budget, keep
        self._held: OrderedDict[Path, int] = OrderedDict()  # fetched here, on disk, LRU first
        self._busy: Counter[Path] = Counter()
        self._verified: set[Path] = set()
        self._lock = threading.RLock()
        self.downloads: list[str] = []  # names fetched, in order (for callers and tests)
        self.peak = 0  # most bytes held + reserved at once (for callers and tests)
        self._closed = False
        self._foreign()  # orphaned partial downloads go before anything is planned

    def windows(self, shards: Sequence[Path]) -> list[list[Path]]:
        """`shards` (in reading order) cut into consecutive runs whose downloads fit the budget
        together: a pass that reads run by run downloads every shard once."""
        room = self._budget - self._foreign()
        out: list[list[Path]] = []
        used = 0
        for shard in shards:
            need = 0 if shard in self._held or shard.is_file() else self._files[shard].size
            if out and out[-1] and used + need <= room:
                out[-1].append(shard)
                used += need
            else:
                out.append([shard])
                used = need
        return out

    @contextmanager
    def open(self, shard: Path) -> Iterator[BinaryIO]:
        with self._lock:
            path = self._acquire(shard)
            self._busy[shard] += 1
        try:
            with open_input(path, "shard") as fh:
                yield fh
        finally:
            with self._lock:
                self._busy[shard] -= 1

    def digest(self, shard: Path) -> str:
        info = self._files[shard]
        if info.sha256:
            return info.sha256
        if shard.is_file():
            return shard_digest(shard)
        with self.open(shard):
            return shard_digest(shard)

    def fetch_side_files(self, wanted: Callable[[str], bool]) -> None:
        """Download the repo's top-level non-shard files that `wanted` accepts (at most
        `SIDE_FILE_LIMIT` bytes each) into the snapshot folder, where they stay (they are
        small, and what a later offline run of the repo finds)."""
        folder = self._remote.local_path("x").parent
        shards = {info.name for info in self._files.values()}
        for info in self._remote.list_files():
            small = info.size <= SIDE_FILE_LIMIT and "/" not in info.name
            if small and info.name not in shards and wanted(info.name):
                if not (folder / info.name).is_file():
                    self._remote.download(info.name)

    def close(self) -> None:
        """Delete the shards this store downloaded (unless `keep`). Never waits for a download
        in flight (Ctrl-C during one): what it brings is deleted when it lands."""
        got = self._lock.acquire(timeout=0.5)
        try:
            self._closed = True
            if not self._keep:
                for shard in list(self._held):
                    if got or not self._busy[shard]:
                        _drop(shard)
            self._held.clear()
        finally:
            if got:
                self._lock.release()

    def _acquire(self, shard: Path) -> Path:
        """`shard` on disk and verified: held, found in the cache, or downloaded now."""
        info = self._files[shard]
        if shard in self._held:
            self._held.move_to_end(shard)
            return shard
        if shard.is_file():  # in the cache before this pass: verified, never counted or dropped
            if info.sha256 and shard not in self._verified:
                label = f"{self._remote.repo_id}/{info.name}"
                verify_sha256(label, shard, info.sha256, delete=True)
                self._verified.add(shard)
            return shard
        check_fits(self._remote.repo_id, info, self._budget)
        self._make_room(info)
        target = self._remote.local_path(info.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(target.parent).free
        if free < info.size:
            raise HubError(
                f"{self._remote.repo_id}/{info.name}: needs {info.size} bytes, only {free} free "
                f"under {target.parent}: free space or set HF_HUB_CACHE elsewhere"
            )
        self.downloads.append(info.name)
        path = self._remote.download(info.name)
        if self._closed:  # closed while it downloaded: nobody will read it
            if not self._keep:
                _drop(path)
            raise HubError(f"{self._remote.repo_id}: the checkpoint was closed during a download")
        self._held[shard] = info.size
        if info.sha256:  # verified before a byte is read
            try:
                verify_sha256(f"{self._remote.repo_id}/{info.name}", path, info.sha256, delete=True)
            except HubError:
                self._held.pop(shard, None)
                _drop(path)
                raise
        self._verified.add(shard)
        return path

    def _make_room(self, info: RemoteFile) -> None:
        """Evict held shards (least recently used first, never one open) until `info` fits."""
        foreign = self._foreign()
        for victim in [s for s in self._held if not self._busy[s]]:
            if sum(self._held.values()) + info.size + foreign <= self._budget:
                break
            _drop(victim)
            del self._held[victim]
        used = sum(self._held.values()) + info.size + foreign
        if used > self._budget:
            raise HubError(
                f"{self._remote.repo_id}/{info.name}: {info.size} bytes do not fit the disk "
                f"budget of {self._budget} bytes beside {sum(self._held.values())} bytes of "
                f"shards open now and {foreign} bytes of other downloads in progress: raise the "
                "budget"
            )
        self.peak = max(self.peak, used)

    def _foreign(self) -> int:
        """Bytes of partial downloads of this repo that a live download owns (orphans are
        deleted first)."""
        any_name = next(iter(self._files.values())).name
        blobs = self._remote.local_path(any_name).parent.parent.parent / "blobs"
        return reclaim_partials(blobs)


def check_fits(repo_id: str, info: RemoteFile, budget: int) -> None:
    """HubError when shard `info` alone is larger than the disk budget."""
    if info.size > budget:
        raise HubError(
            f"{repo_id}/{info.name}: shard is {info.size} bytes ({info.size / 2**20:,.1f} MiB), "
            f"more than the disk budget of {budget} bytes: raise the budget to at least "
            f"{info.size} bytes"
        )


def reclaim_partials(blobs: Path) -> int:
    """Delete the partial downloads (`<blob>[.<id>].incomplete`) in a repo's `blobs` folder that
    no live download owns, and return the bytes of those that one does.

    huggingface_hub writes a blob to a partial file while holding the file lock
    `<cache>/.locks/<repo folder>/<blob>.lock`: a partial whose lock can be taken at once (or
    that has no lock file) belongs to a download that ended without cleaning up (a killed run).
    """
    from filelock import FileLock, Timeout

    try:
        partials = sorted(blobs.glob("*.incomplete"))
    except OSError:
        return 0
    locks = blobs.parent.parent / ".locks" / blobs.parent.name
    live = 0
    for part in partials:
        lock_file = locks / f"{part.name.split('.')[0]}.lock"
        try:
            size = part.stat().st_size
        except OSError:
            continue
        if not lock_file.is_file():
            part.unlink(missing_ok=True)
            continue
        lock = FileLock(str(lock_file), timeout=0)
        try:
            with lock:
                part.unlink(missing_ok=True)
        except Timeout:
            live += size
        except OSError:
            live += size
    return live


def _drop(path: Path) -> None:
    """Delete a downloaded shard: its cache blob too when `path` is a snapshot symlink."""
    real = path.resolve()
    path.unlink(missing_ok=True)
    if real != path:
        real.unlink(missing_ok=True)


# -- huggingface-hub ----------------------------------------------------------------------------
class HubRemote:
    """A Hub repo at the commit its revision names now, through huggingface-hub (the only code
    here that calls it; every call through `hub_call`: timed out, retried, mapped to HubError).

    Files are fetched with the user's revision (`snapshot_download` / `hf_hub_download`), as
    huggingface_hub intends, so it records `refs/<revision>` and a later offline run (or `hf
    cache`, `hf download`) finds the same snapshot. A revision that moves to another commit while
    spectra runs is refused, not mixed.
    """

    def __init__(self, repo_id: str, revision: str | None, cache_dir: Path) -> None:
        self.repo_id, self.revision, self._cache = repo_id, revision, cache_dir
        self.commit, self._files = self._listing(revision)

    def _listing(self, revision: str | None) -> tuple[str, list[RemoteFile]]:
        from huggingface_hub import HfApi

        info = hub_call(
            self.repo_id,
            lambda: HfApi().model_info(
                self.repo_id, revision=revision, files_metadata=True, timeout=hub_timeout()
            ),
        )
        commit = info.sha or (revision or "main")
        files = [
            RemoteFile(s.rfilename, int(s.size or 0), s.lfs.sha256 if s.lfs else None)
            for s in (info.siblings or [])
        ]
        return commit, files

    def list_files(self) -> list[RemoteFile]:
        return list(self._files)

    def read_bytes(self, name: str, start: int, length: int) -> bytes:
        """Bytes `start` to `start + length` of `name` at the resolved commit: one HTTP Range
        request for exactly those bytes (huggingface_hub's session, headers and token; redirects
        to the CDN followed), so a header costs its own size, never a whole file or a 5 MiB
        block. A server that ignores Range is read only as far as needed."""
        from huggingface_hub import get_session, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

        if length <= 0:
            return b""
        url = hf_hub_url(self.repo_id, name, revision=self.commit)
        headers = {**build_hf_headers(), "Range": f"bytes={start}-{start + length - 1}"}

        def read() -> bytes:
            with get_session().stream(
                "GET", url, headers=headers, follow_redirects=True, timeout=hub_timeout()
            ) as response:
                hf_raise_for_status(response)
                skip = 0 if response.status_code == 206 else start  # Range ignored: 200
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) >= skip + length:
                        break
            return bytes(data[skip : skip + length])

        return hub_call(f"{self.repo_id}/{name}", read)

    def local_path(self, name: str) -> Path:
        return repo_folder(self.repo_id, self._cache) / "snapshots" / self.commit / name

    def download(self, name: str) -> Path:
        """`name` into the cache (by the user's revision), its sha256 verified."""
        from huggingface_hub import hf_hub_download

        label = f"{self.repo_id}/{name}"
        path = Path(
            hub_call(
                label,
                lambda: hf_hub_download(
                    self.repo_id,
                    name,
                    revision=self.revision,
                    cache_dir=self._cache,
                    etag_timeout=hub_timeout(),
                ),
                retry_network=False,
            )
        )
        self._same_commit(path.parent)
        self._verify(path.parent, [name])
        return path

    def download_all(self) -> Path:
        """The snapshot of the safetensors and JSON files (by the user's revision), every LFS
        file's sha256 verified against the listing."""
        from huggingface_hub import snapshot_download

        names = [f.name for f in self._files]
        if not any(n.endswith(".safetensors") for n in names):
            _remote_names(self.repo_id, self, {f.name: f for f in self._files})  # raises
        folder = Path(
            hub_call(
                self.repo_id,
                lambda: snapshot_download(
                    self.repo_id,
                    revision=self.revision,
                    allow_patterns=list(ALLOW_PATTERNS),
                    cache_dir=self._cache,
                    etag_timeout=hub_timeout(),
                ),
                retry_network=False,
            )
        )
        self._same_commit(folder)
        self._verify(folder, [n for n in names if (folder / n).is_file()])
        return folder

    def _same_commit(self, snapshot: Path) -> None:
        if snapshot.name != self.commit:
            raise HubError(
                f"{self.repo_id}: revision {self.revision or 'main'} moved from commit "
                f"{self.commit[:12]} to {snapshot.name[:12]} while spectra was reading it: run "
                "again, or pin a commit with org/name@<commit>"
            )

    def _verify(self, folder: Path, names: list[str]) -> None:
        sha = {f.name: f.sha256 for f in self._files}
        stamps = repo_folder(self.repo_id, self._cache) / STAMPS
        for name in names:
            expected = sha.get(name)
            if expected:
                label = f"{self.repo_id}/{name}"
                verify_sha256(label, folder / name, expected, delete=True, stamps=stamps)
