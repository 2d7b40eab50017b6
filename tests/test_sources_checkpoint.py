"""Checkpoint over local files: listing from headers, exact reads, shard order, content keys."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from _source_fixtures import write_llama_like, write_safetensors
from safetensors.torch import load_file

from spectra.errors import SourceError, ValidationError
from spectra.sources import reader
from spectra.sources.checkpoint import Checkpoint
from spectra.sources.reader import shard_digest


def _reference(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_minilm_every_float_matrix_has_a_role_and_reads_exactly(minilm_path: Path) -> None:
    ref = load_file(str(minilm_path / "model.safetensors"))
    with Checkpoint.open(minilm_path) as ckpt:
        mats = ckpt.matrices()
        by_name = {m.tensor.name: m for m in mats}
        float_2d = [
            n for n, t in ref.items() if t.ndim == 2 and t.is_floating_point() and t.numel() > 0
        ]
        assert sorted(by_name) == sorted(float_2d)
        assert "embeddings.position_ids" not in by_name  # I64 buffer, not a weight
        q = by_name["encoder.layer.3.attention.self.query.weight"]
        assert (q.role, q.layer, q.shape, q.transpose) == ("q", 3, (384, 384), False)
        expect = {
            "encoder.layer.0.attention.self.key.weight": "k",
            "encoder.layer.0.attention.self.value.weight": "v",
            "encoder.layer.0.attention.output.dense.weight": "o",
            "encoder.layer.0.intermediate.dense.weight": "up",
            "encoder.layer.0.output.dense.weight": "down",
            "embeddings.word_embeddings.weight": "embedding",
            "pooler.dense.weight": "other",
        }
        for name, role in expect.items():
            assert by_name[name].role == role, name
        assert by_name["encoder.layer.5.output.dense.weight"].shape == (384, 1536)
        assert by_name["encoder.layer.5.intermediate.dense.weight"].shape == (1536, 384)
        roles = {m.role for m in mats if m.layer is not None}
        assert roles == {"q", "k", "v", "o", "up", "down"}
        assert sum(1 for m in mats if m.layer is not None) == 36
        W = ckpt.read(q)
        assert W.dtype == torch.float32 and torch.equal(W, ref[q.tensor.name])
        W64 = ckpt.read(q.tensor.name, dtype=torch.float64)
        assert torch.equal(W64, ref[q.tensor.name].double())
        # Non-matrix tensors read as stored too.
        pos = ckpt.read("embeddings.position_ids", dtype=None)
        assert torch.equal(pos, ref["embeddings.position_ids"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sharded_reads_equal_reference(tmp_path: Path, dtype: torch.dtype) -> None:
    folder = write_llama_like(tmp_path / "m", dtype=dtype, shards=3)
    ref = _reference(folder)
    with Checkpoint.open(folder) as ckpt:
        assert len(ckpt.files) == 3
        assert {t.name for t in ckpt.tensors()} == set(ref)
        mats = ckpt.matrices()
        got = dict(ckpt.read_many(mats))
        for m in mats:
            assert torch.equal(got[m], ref[m.tensor.name].float()), m.key
        kept = ckpt.read(mats[0], dtype=None)
        assert kept.dtype == dtype and torch.equal(kept, ref[mats[0].tensor.name])


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_reads_equal_reference(tmp_path: Path, fp8: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(24, 40, generator=g) * 3).to(fp8)
    path = write_safetensors(tmp_path / "fp8.safetensors", {"layers.0.mlp.up_proj.weight": w})
    with Checkpoint.open(path) as ckpt:
        (m,) = ckpt.matrices()
        assert m.tensor.dtype == ("F8_E4M3" if fp8 == torch.float8_e4m3fn else "F8_E5M2")
        ref = load_file(str(path))["layers.0.mlp.up_proj.weight"]
        assert torch.equal(ckpt.read(m), ref.float())
        assert torch.equal(ckpt.read(m, dtype=torch.float64), ref.double())


def test_listing_reads_headers_only(tmp_path: Path) -> None:
    folder = write_llama_like(tmp_path / "m", shards=2)
    ckpt_before = Checkpoint.open(folder)
    expected = [(m.key, m.role, m.shape) for m in ckpt_before.matrices()]
    for shard in ckpt_before.files:  # overwrite every data region with garbage
        hlen = int.from_bytes(shard.read_bytes()[:8], "little")
        size = shard.stat().st_size
        with shard.open("r+b") as fh:
            fh.seek(8 + hlen)
            fh.write(b"\xff" * (size - 8 - hlen))
    ckpt = Checkpoint.open(folder)
    assert [(m.key, m.role, m.shape) for m in ckpt.matrices()] == expected


def test_read_many_opens_each_file_once_in_shard_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_llama_like(tmp_path / "m", shards=3)
    ckpt = Checkpoint.open(folder)
    mats = ckpt.matrices()
    opened: list[str] = []
    real_open = reader.open_input  # every shard is opened by the one input function

    def spy(path: Path, what: str = "file") -> io.IOBase:
        if Path(path).suffix == ".safetensors":
            opened.append(Path(path).name)
        return real_open(path, what)  # type: ignore[return-value]

    monkeypatch.setattr(reader, "open_input", spy)
    order = [m.key for m, _ in ckpt.read_many(list(reversed(mats)))]
    assert opened == [p.name for p in ckpt.files]
    shard_rank = {p: i for i, p in enumerate(ckpt.files)}
    ranks = [(shard_rank[ckpt._by_key[k].tensor.shard], ckpt._by_key[k].offset) for k in order]
    assert ranks == sorted(ranks)


def test_include_exclude_roles(tmp_path: Path) -> None:
    ckpt = Checkpoint.open(write_llama_like(tmp_path / "m", layers=3))
    assert {m.role for m in ckpt.matrices(roles=["q", "k"])} == {"q", "k"}
    only1 = ckpt.matrices(include=["model.layers.1.*"])
    assert {m.layer for m in only1} == {1} and len(only1) == 7
    no_mlp = ckpt.matrices(exclude=["*.mlp.*"], roles=["down", "q"])
    assert {m.role for m in no_mlp} == {"q"}
    with pytest.raises(ValidationError, match="'queries'.*choose from"):
        ckpt.matrices(roles=["queries"])


def test_content_key_stable_and_distinct(tmp_path: Path) -> None:
    a = write_llama_like(tmp_path / "a", seed=0)
    b = write_llama_like(tmp_path / "b", seed=0)
    c = write_llama_like(tmp_path / "c", seed=1)
    keys = [
        Checkpoint.open(p).content_key("model.layers.0.self_attn.q_proj.weight") for p in (a, b, c)
    ]
    assert keys[0] == keys[1] != keys[2]
    ckpt = Checkpoint.open(a)
    m = ckpt.matrices()[0]
    digest, offset, nbytes, dtype, shape = ckpt.content_key(m).split(":")
    assert digest == shard_digest(m.tensor.shard) and len(digest) == 64
    assert (int(offset), int(nbytes), dtype) == (m.tensor.offset, m.tensor.nbytes, "BF16")
    assert shape == "x".join(map(str, m.shape))
    assert len({ckpt.content_key(x) for x in ckpt.matrices()}) == len(ckpt.matrices())


def test_shard_digest_is_sha256_and_tracks_changes(tmp_path: Path) -> None:
    import hashlib

    p = write_safetensors(tmp_path / "x.safetensors", {"w": torch.zeros(4, 4)})
    assert shard_digest(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    write_safetensors(p, {"w": torch.ones(4, 4)})
    assert shard_digest(p) == hashlib.sha256(p.read_bytes()).hexdigest()


def test_unknown_names_and_foreign_refs(tmp_path: Path) -> None:
    a = Checkpoint.open(write_llama_like(tmp_path / "a"))
    b = Checkpoint.open(write_llama_like(tmp_path / "b"))
    with pytest.raises(SourceError, match="no tensor or matrix named 'nope'"):
        a.read("nope")
    with pytest.raises(ValidationError, match="another checkpoint"):
        a.read(b.matrices()[0])
    with pytest.raises(ValidationError, match="Hub repos"):
        Checkpoint.open(tmp_path / "a", revision="main")
