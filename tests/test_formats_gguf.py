"""GGUF header reader and block dequantization against the gguf package's own writer, quantizer
and dequantizer (`gguf.quants.dequantize`, the reference)."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _gguf_fixtures import QUANTIZABLE, encode, kquant_blocks, qtype, write_gguf
from gguf import GGUFReader
from gguf.quants import dequantize
from typer.testing import CliRunner

from spectra.cli.main import app
from spectra.errors import SourceError
from spectra.formats.gguf import GgufCodec, decode_rows, read_gguf
from spectra.linalg.engine import EngineOptions, compute_spectra
from spectra.sources.checkpoint import Checkpoint

KQUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
ROWS, COLS = 6, 512  # COLS: whole blocks of 32 and of 256


def _one_matrix(tmp_path: Path, type_name: str, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A GGUF file holding blk.0.ffn_up.weight (ROWS x COLS) as `type_name` and a norm; the
    stored array as written."""
    if type_name in KQUANTS:
        stored = kquant_blocks(type_name, ROWS, COLS, seed)
    else:
        rng = np.random.default_rng(seed)
        stored = encode(rng.standard_normal((ROWS, COLS)).astype(np.float32), type_name)
    path = write_gguf(
        tmp_path / f"{type_name}.gguf",
        [
            ("blk.0.attn_norm.weight", np.ones(COLS, dtype=np.float32), "F32"),
            ("blk.0.ffn_up.weight", stored, type_name),
        ],
        arch="qwen2",  # no q/k permutation involved here
    )
    return path, stored


@pytest.mark.parametrize("type_name", ("F32", *QUANTIZABLE, *KQUANTS))
def test_dequantization_equals_gguf_reference(tmp_path: Path, type_name: str) -> None:
    path, stored = _one_matrix(tmp_path, type_name)
    reader = GGUFReader(str(path))
    (ref_tensor,) = [t for t in reader.tensors if t.name == "blk.0.ffn_up.weight"]
    assert ref_tensor.tensor_type == qtype(type_name)
    reference = dequantize(ref_tensor.data, ref_tensor.tensor_type)  # from the file's bytes
    assert reference.shape == (ROWS, COLS)
    with Checkpoint.open(path) as ckpt:
        (m,) = ckpt.matrices()
        assert (m.key, m.role, m.layer, m.shape) == (
            "model.layers.0.mlp.up_proj.weight",
            "up",
            0,
            (ROWS, COLS),
        )
        got = ckpt.read(m)
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.from_numpy(np.array(reference)))
    # the blocks the test wrote are the blocks read back (no re-encoding on the way)
    assert torch.equal(
        got, torch.from_numpy(dequantize(stored, qtype(type_name)).reshape(ROWS, COLS))
    )


@pytest.mark.parametrize("type_name", ("Q4_1", "Q6_K"))
def test_chunked_decoding_equals_whole(tmp_path: Path, type_name: str) -> None:
    path, _ = _one_matrix(tmp_path, type_name, seed=3)
    header = read_gguf(path)
    t = next(t for t in header.tensors if t.name == "blk.0.ffn_up.weight")
    with open(path, "rb") as fh:
        fh.seek(t.offset)
        raw = torch.frombuffer(bytearray(fh.read(t.nbytes)), dtype=torch.uint8).view(ROWS, -1)
    whole = decode_rows(raw, t.type_name, t.block_size, t.type_size)
    # 3 blocks per chunk: chunks end inside rows and inside the last partial chunk
    small = decode_rows(raw, t.type_name, t.block_size, t.type_size, chunk_bytes=3 * t.type_size)
    assert torch.equal(whole, small)


def test_types_without_native_decoder_use_the_gguf_package(tmp_path: Path) -> None:
    """MXFP4 and TQ2_0 (quantizers in gguf 0.19, not decoded natively): the package decodes them."""
    rng = np.random.default_rng(1)
    for type_name in ("MXFP4", "TQ2_0"):
        stored = encode(rng.standard_normal((4, 256)).astype(np.float32), type_name)
        path = write_gguf(
            tmp_path / f"{type_name}.gguf",
            [("blk.0.ffn_down.weight", stored, type_name)],
            arch="qwen2",
        )
        with Checkpoint.open(path) as ckpt:
            got = ckpt.read("model.layers.0.mlp.down_proj.weight")
        assert torch.equal(got, torch.from_numpy(dequantize(stored, qtype(type_name))))


def test_storage_label_names_type_block_and_bits(tmp_path: Path) -> None:
    path, _ = _one_matrix(tmp_path, "Q4_K")
    with Checkpoint.open(path) as ckpt:
        (m,) = ckpt.matrices()
    assert m.storage == "gguf:Q4_K 4.5-bit block 256"  # 144 bytes per 256 values
    assert m.nbytes == ROWS * COLS // 256 * 144  # stored bytes
    assert GgufCodec("Q4_1", 32, 20).storage.label() == "gguf:Q4_1 5-bit block 32"


def test_header_fields_match_gguf_reader(tmp_path: Path) -> None:
    path, _ = _one_matrix(tmp_path, "Q5_0")
    ours = read_gguf(path)
    ref = GGUFReader(str(path))
    assert [(t.name, t.offset, t.nbytes, t.type_name) for t in ours.tensors] == [
        (t.name, int(t.data_offset), int(t.n_bytes), t.tensor_type.name) for t in ref.tensors
    ]
    assert [t.shape for t in ours.tensors] == [(COLS,), (ROWS, COLS)]  # ne reversed
    assert ours.metadata["general.architecture"] == "qwen2"


def test_planted_spectrum_survives_quantization(tmp_path: Path) -> None:
    """W = U diag(s) V^T with known s, stored as Q8_0 and Q4_0: the spectrum read back is the
    float64 SVD of the dequantized matrix (to float32 rounding) and within Weyl's bound
    ||W_q - W||_2 of the planted one."""
    rng = np.random.default_rng(7)
    m, n = 48, 256
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, m)))
    planted = np.geomspace(10.0, 0.1, m)
    w = (u * planted) @ v.T
    for type_name in ("Q8_0", "Q4_0"):
        stored = encode(w.astype(np.float32), type_name)
        path = write_gguf(
            tmp_path / f"{type_name}.gguf",
            [("blk.0.ffn_up.weight", stored, type_name)],
            arch="qwen2",
        )
        deq = dequantize(stored, qtype(type_name)).astype(np.float64)
        exact = np.linalg.svd(deq, compute_uv=False)
        with Checkpoint.open(path) as ckpt:
            (spec,) = compute_spectra(ckpt, engine=EngineOptions(device="cpu"))
        got = spec.values.numpy()
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5 * exact[0])
        weyl = np.linalg.norm(deq - w, 2)
        assert np.max(np.abs(got - planted)) <= weyl * (1 + 1e-3) + 1e-5
        assert weyl < (0.02 if type_name == "Q8_0" else 0.3) * planted[0]  # quantization error


# -- refusals: one line each, never a traceback ---------------------------------------------


def _tensor_info_at(path: Path, name: str) -> int:
    """Byte position just after the name string of tensor `name` in the header."""
    data = path.read_bytes()
    encoded = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(encoded)
    return at + len(encoded)


def _refused(path: Path, fragment: str) -> str:
    with pytest.raises(SourceError) as err:
        Checkpoint.open(path)
    text = str(err.value)
    assert "\n" not in text and fragment in text, text
    return text


def test_refuses_garbage_and_truncation(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(100))
    _refused(junk, "no GGUF magic")
    path, _ = _one_matrix(tmp_path, "Q8_0")
    data = path.read_bytes()
    header_end = read_gguf(path).data_start
    for cut in (10, 30, header_end - 5):
        short = tmp_path / f"cut{cut}.gguf"
        short.write_bytes(data[:cut])
        _refused(short, "truncated")
    in_data = tmp_path / "cut_data.gguf"
    in_data.write_bytes(data[:-7])
    _refused(in_data, "past the end of the file")


def test_refuses_bad_fields(tmp_path: Path) -> None:
    path, _ = _one_matrix(tmp_path, "Q8_0")
    data = bytearray(path.read_bytes())
    at = _tensor_info_at(path, "blk.0.ffn_up.weight")  # n_dims u32, 2 x ne u64, type u32, offset
    bad_type = bytearray(data)
    bad_type[at + 4 + 16 : at + 4 + 16 + 4] = struct.pack("<I", 4)  # Q4_2, removed from ggml
    (tmp_path / "type.gguf").write_bytes(bad_type)
    _refused(tmp_path / "type.gguf", "unknown GGML type 4")
    far = bytearray(data)
    far[at + 24 : at + 32] = struct.pack("<Q", 1 << 40)
    (tmp_path / "far.gguf").write_bytes(far)
    _refused(tmp_path / "far.gguf", "past the end of the file")
    odd = bytearray(data)
    odd[at + 24 : at + 32] = struct.pack("<Q", 8)
    (tmp_path / "odd.gguf").write_bytes(odd)
    _refused(tmp_path / "odd.gguf", "not a multiple of the alignment")
    dims = bytearray(data)
    dims[at : at + 4] = struct.pack("<I", 9)
    (tmp_path / "dims.gguf").write_bytes(dims)
    _refused(tmp_path / "dims.gguf", "9 dimensions")
    old = bytearray(data)
    old[4:8] = struct.pack("<I", 1)
    (tmp_path / "v1.gguf").write_bytes(old)
    _refused(tmp_path / "v1.gguf", "GGUF version 1 is not supported")
    big = bytearray(data)
    big[4:8] = struct.pack(">I", 3)
    (tmp_path / "be.gguf").write_bytes(big)
    _refused(tmp_path / "be.gguf", "big-endian")
    many = bytearray(data)
    many[8:16] = struct.pack("<Q", 1 << 50)
    (tmp_path / "many.gguf").write_bytes(many)
    _refused(tmp_path / "many.gguf", "tensor count")


def test_cli_refuses_garbage_gguf_in_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 60)
    for command in ("inspect", "report"):
        args = [command, str(junk)] + (["-o", str(tmp_path / "out")] if command == "report" else [])
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "GGUF" in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_missing_gguf_package_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = _one_matrix(tmp_path, "Q8_0")
    monkeypatch.setitem(sys.modules, "gguf.constants", None)  # import fails as if not installed
    text = _refused(path, "pip install 'spectra[gguf]'")
    assert text.startswith("reading GGUF files needs the gguf package")
