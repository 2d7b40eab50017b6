"""Bad inputs: each one a SourceError naming the file and what to do, and nothing read outside.

"Nothing read outside the folder" is checked by spying on every file open during the call.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _source_fixtures import write_llama_like, write_safetensors

from spectra.errors import SourceError
from spectra.sources import Checkpoint
from spectra.sources.header import MAX_HEADER_BYTES


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
