"""Bad inputs: each one a SourceError naming the file and what to do, and nothing read outside.

"Nothing read outside the folder" is checked by spying on every file open during the call.
"""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from _source_fixtures import write_llama_like, write_safetensors
from safetensors.torch import load_file

from spectra.errors import SourceError
from spectra.formats.safetensors import MAX_HEADER_BYTES, ShardHeader
from spectra.sources import checkpoint as checkpoint_module
from spectra.sources import hub as hub_module
from spectra.sources.checkpoint import Checkpoint
from spectra.sources.hub import RemoteFile, snapshot_shards, streaming_shards
from spectra.sources.layout import IndexMismatchWarning


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Every path opened through Path.open / Path.read_text / io.open during the test."""
    seen: list[Path] = []
    real_open = Path.open

    def spy(self: Path, *args: object, **kwargs: object):  # noqa: ANN202
        seen.append(self.resolve())
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", spy)
    yield seen


def _only_inside(seen: list[Path], folder: Path) -> None:
    root = folder.resolve()
    outside = [p for p in seen if root not in p.parents and p != root]
    assert not outside, outside


def _raw_file(path: Path, header: bytes, data: bytes = b"", hlen: int | None = None) -> Path:
    n = len(header) if hlen is None else hlen
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


def test_path_not_found(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"no such file or folder.*Hub repo id"):
        Checkpoint.open(tmp_path / "missing")


def test_folder_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SourceError, match=r"no \.safetensors files"):
        Checkpoint.open(tmp_path)


def test_index_names_missing_shard(tmp_path: Path, opened: list[Path]) -> None:
    folder = write_llama_like(tmp_path / "m", shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        SourceError, match=r"names shard 'model-00002-of-00002.safetensors'.*missing"
    ):
        Checkpoint.open(folder)
    _only_inside(opened, folder)


@pytest.mark.parametrize(
    "bad", ["../x.safetensors", "sub/../../x.safetensors", "/etc/x.safetensors"]
)
def test_index_entry_outside_folder_is_refused_unread(
    tmp_path: Path, opened: list[Path], bad: str
) -> None:
    folder = write_llama_like(tmp_path / "m", shards=1)
    outside = write_safetensors(tmp_path / "x.safetensors", {"w": torch.zeros(2, 2)})
    index = folder / "model.safetensors.index.json"
    body = json.loads(index.read_text())
    body["weight_map"]["model.norm.weight"] = bad
    index.write_text(json.dumps(body))
    opened.clear()
    with pytest.raises(SourceError, match=r"outside the checkpoint folder; refusing"):
        Checkpoint.open(folder)
    assert outside.resolve() not in opened
    _only_inside(opened, folder)


def test_truncated_file(tmp_path: Path) -> None:
    p = write_safetensors(tmp_path / "m.safetensors", {"w.weight": torch.zeros(8, 8)})
    p.write_bytes(p.read_bytes()[:5])
    with pytest.raises(SourceError, match=r"m\.safetensors: truncated file \(5 bytes"):
        Checkpoint.open(p)


def test_header_length_larger_than_file(tmp_path: Path) -> None:
    p = _raw_file(tmp_path / "m.safetensors", b"{}", hlen=10_000)
    with pytest.raises(SourceError, match=r"header length 10000 is larger than the file"):
        Checkpoint.open(p)


def test_header_length_insane(tmp_path: Path) -> None:
    p = _raw_file(tmp_path / "m.safetensors", b"{}", hlen=MAX_HEADER_BYTES + 1)
    with open(p, "r+b") as fh:  # make the file "large" without writing 100 MB
        fh.truncate(MAX_HEADER_BYTES + 64)
    with pytest.raises(SourceError, match=r"exceeds 100000000 bytes"):
        Checkpoint.open(p)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"{not json", r"invalid header JSON"),
        (b"[1, 2]", r"must be an object"),
        (b"\xff\xfe{}", r"not valid UTF-8"),
        (
            b'{"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}',
            r"'w': unknown dtype 'F33'",
        ),
        (b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', r"'w': shape must be"),
        (
            b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}',
            r"'w': shape \[2\] of F32 needs 8",
        ),
        (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}', r"'w': data_offsets"),
        (
            b'{"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 4]}}',
            r"needs 73786976294838206464 bytes",
        ),
        (
            b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
            b' "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}',
            r"'b' overlaps tensor 'a'",
        ),
        (
            b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {}}',
            r"'w' appears twice",
        ),
        (b'{"__metadata__": {"a": 1}}', r"__metadata__ must map strings"),
    ],
)
def test_invalid_headers(tmp_path: Path, header: bytes, message: str) -> None:
    p = _raw_file(tmp_path / "bad.safetensors", header, b"\0" * 16)
    with pytest.raises(SourceError, match=message) as info:
        Checkpoint.open(p)
    assert "bad.safetensors" in str(info.value)


def test_tensor_range_beyond_file(tmp_path: Path) -> None:
    header = b'{"w.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}'
    p = _raw_file(tmp_path / "m.safetensors", header, b"\0" * 10)
    with pytest.raises(SourceError, match=r"'w.weight': byte range .* exceeds the file"):
        Checkpoint.open(p)


def test_duplicate_names_across_shards(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "a.safetensors", {"w.weight": torch.zeros(2, 2)})
    write_safetensors(tmp_path / "b.safetensors", {"w.weight": torch.ones(2, 2)})
    with pytest.raises(
        SourceError, match=r"'w.weight' appears in two shards \(a.safetensors and b"
    ):
        Checkpoint.open(tmp_path)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt", ".pth"])
def test_pickles_are_refused_never_opened(tmp_path: Path, opened: list[Path], suffix: str) -> None:
    p = tmp_path / f"pytorch_model{suffix}"
    p.write_bytes(b"\x80\x04 not really a pickle")
    opened.clear()
    with pytest.raises(SourceError, match=r"refusing a pickled checkpoint.*never unpickles.*save"):
        Checkpoint.open(p)
    with pytest.raises(SourceError, match=r"only pickled weights here .*safetensors"):
        Checkpoint.open(tmp_path)
    assert p.resolve() not in opened


def test_empty_checkpoint(tmp_path: Path) -> None:
    p = write_safetensors(tmp_path / "m.safetensors", {})
    with pytest.raises(SourceError, match=r"empty checkpoint"):
        Checkpoint.open(p)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(SourceError, match=r"lists no tensors \(empty checkpoint\)"):
        Checkpoint.open(tmp_path)


def test_file_shrinks_after_listing(tmp_path: Path) -> None:
    p = write_safetensors(tmp_path / "m.safetensors", {"w.weight": torch.ones(16, 16)})
    ckpt = Checkpoint.open(p)
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    with pytest.raises(SourceError, match=r"truncated data"):
        ckpt.read("w.weight")


# -- the index's weight_map against the shard headers -----------------------------------------
INDEX = "model.safetensors.index.json"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def _two_shards(tmp_path: Path) -> Path:
    """12 tensors: embed, input norm, q/k/v/o in shard 1; post-attention norm, gate/up/down,
    norm, lm_head in shard 2."""
    return write_llama_like(tmp_path / "m", layers=1, hidden=8, intermediate=16, vocab=10)


def _edit_index(folder: Path, edit: Callable[[dict[str, str]], None]) -> None:
    body = json.loads((folder / INDEX).read_text())
    edit(body["weight_map"])
    (folder / INDEX).write_text(json.dumps(body))


class _FolderRemote:
    """A `RemoteRepo` over a local folder (streaming path of `spectra.sources.hub`)."""

    repo_id = "org/repo"

    def __init__(self, folder: Path, cache: Path) -> None:
        self.folder, self.cache = folder, cache

    def list_files(self) -> list[RemoteFile]:
        return [RemoteFile(p.name, p.stat().st_size) for p in sorted(self.folder.iterdir())]

    def read_bytes(self, name: str, start: int, length: int) -> bytes:
        return (self.folder / name).read_bytes()[start : start + length]

    def local_path(self, name: str) -> Path:
        return self.cache / name

    def download(self, name: str) -> Path:
        self.cache.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copyfile(self.folder / name, self.cache / name))


def _open_three_ways(folder: Path, tmp_path: Path) -> Iterator[Callable[[], Checkpoint]]:
    """A local folder, a Hub snapshot folder, a streamed Hub repo: each checks the index."""
    yield lambda: Checkpoint.open(folder)
    yield lambda: Checkpoint.from_shards(snapshot_shards("org/repo", folder))
    remote = _FolderRemote(folder, tmp_path / "cache")
    yield lambda: Checkpoint.from_shards(streaming_shards("org/repo", remote, disk_budget=10**9))


def test_index_lists_tensors_no_shard_contains(tmp_path: Path) -> None:
    folder = _two_shards(tmp_path)
    shard2 = load_file(str(folder / SHARD2))
    # shard 2 replaced by a file that holds only lm_head (another export's shard)
    write_safetensors(folder / SHARD2, {"lm_head.weight": shard2["lm_head.weight"]})
    for opener in _open_three_ways(folder, tmp_path):
        with pytest.raises(SourceError) as err:
            opener()
        msg = str(err.value)
        assert msg.startswith(("org/repo: ", f"{folder}: ")), msg
        assert (
            "the index lists 5 tensors that no shard contains ("
            f"'model.layers.0.post_attention_layernorm.weight' in '{SHARD2}', "
            f"'model.layers.0.mlp.gate_proj.weight' in '{SHARD2}', "
            f"'model.layers.0.mlp.up_proj.weight' in '{SHARD2}', ...): the download is "
            "incomplete or the index belongs to other shards; re-download the checkpoint"
        ) in msg
        assert "down_proj" not in msg and "model.norm.weight" not in msg  # at most 3 names


def test_index_lists_one_tensor_that_is_nowhere(tmp_path: Path) -> None:
    folder = _two_shards(tmp_path)
    _edit_index(folder, lambda wm: wm.update({"model.layers.3.mlp.up_proj.weight": SHARD2}))
    with pytest.raises(
        SourceError,
        match=r"lists 1 tensor that no shard contains \('model.layers.3.mlp.up_proj.weight' in "
        r"'model-00002-of-00002.safetensors'\): the download",
    ):
        Checkpoint.open(folder)


def test_hostile_names_in_the_index_are_clipped(tmp_path: Path) -> None:
    folder = _two_shards(tmp_path)
    evil = "\x1b]0;pwned\x07" + "a" * 100_000 + "\n<script>"
    _edit_index(folder, lambda wm: wm.update({evil: SHARD1}))
    with pytest.raises(SourceError) as err:
        Checkpoint.open(folder)
    msg = str(err.value)
    assert "no shard contains" in msg
    assert len(msg) < 600 and "\n" not in msg and "\x1b" not in msg and "\x07" not in msg


def test_tensor_in_another_shard_than_the_index_says(tmp_path: Path) -> None:
    folder = _two_shards(tmp_path)
    _edit_index(folder, lambda wm: wm.update({"model.norm.weight": SHARD1}))
    for opener in _open_three_ways(folder, tmp_path):
        with pytest.raises(SourceError) as err:
            opener()
        assert (
            "the index and the shards disagree on where 1 tensor is ('model.norm.weight' in "
            f"'{SHARD2}' (index: '{SHARD1}')): the files come from different revisions or "
            "exports; re-download the checkpoint"
        ) in str(err.value)


def test_index_and_shards_swapped_many(tmp_path: Path) -> None:
    folder = _two_shards(tmp_path)
    swap = {SHARD1: SHARD2, SHARD2: SHARD1}
    _edit_index(folder, lambda wm: wm.update({k: swap[v] for k, v in wm.items()}))
    with pytest.raises(SourceError, match=r"disagree on where 12 tensors are \(.*, \.\.\.\)"):
        Checkpoint.open(folder)


def test_tensors_the_index_omits_warn_and_are_listed(tmp_path: Path) -> None:
    folder = _two_shards(tmp_path)
    with Checkpoint.open(folder) as ckpt:
        every = [t.name for t in ckpt.tensors()]
    omitted = ["model.norm.weight", "lm_head.weight"]
    _edit_index(folder, lambda wm: [wm.pop(n) for n in omitted])
    first, second = (n for n in every if n in omitted)  # named in shard order, then offset
    for opener in _open_three_ways(folder, tmp_path):
        with pytest.warns(IndexMismatchWarning) as record:
            ckpt = opener()
        assert len(record) == 1
        assert str(record[0].message).endswith(
            f": the shards hold 2 tensors that the index does not list ('{first}', '{second}'); "
            "listing them anyway"
        )
        assert [t.name for t in ckpt.tensors()] == every
        assert torch.equal(ckpt.read("lm_head.weight"), ckpt.read("lm_head.weight"))


def test_warning_points_at_the_caller(tmp_path: Path) -> None:
    folder = _two_shards(tmp_path)
    _edit_index(folder, lambda wm: [wm.pop(n) for n in list(wm)[:5]])
    with pytest.warns(IndexMismatchWarning, match=r"5 tensors .*, \.\.\.\); listing") as record:
        Checkpoint.open(folder)
    assert record[0].filename == __file__


def test_consistent_index_opens_silently_reading_each_header_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _two_shards(tmp_path)
    parsed: list[Path] = []
    real = checkpoint_module.read_header

    def counting(path: Path) -> ShardHeader:
        parsed.append(path)
        return real(path)

    monkeypatch.setattr(checkpoint_module, "read_header", counting)
    monkeypatch.setattr(hub_module, "read_header", counting)  # the snapshot's shards
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for opener in _open_three_ways(folder, tmp_path):
            with opener() as ckpt:
                assert len(ckpt.tensors()) == 12
    # local folder and snapshot: one parse per shard (the check reuses the headers)
    assert [p.name for p in parsed] == [SHARD1, SHARD2, SHARD1, SHARD2]


def test_single_file_minilm_is_unaffected(minilm_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Checkpoint.open(minilm_path) as ckpt:
            names = [t.name for t in ckpt.tensors()]
    assert len(ckpt.files) == 1 and len(names) > 100
    assert len(ckpt.matrices(roles=["q"])) == 6
