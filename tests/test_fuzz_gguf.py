"""Fuzzing the GGUF reader with hostile files: byte mutations of the header and truncations of a
valid file (written by the gguf package). Every case ends in a `SpectraError` with a one-line
message, or opens and reads every matrix and tensor; nothing is opened outside the case's folder
and the Python heap never grows by what a mutated header claims."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _fuzz_helpers import FUZZ, ReadGuard, bounded_alloc, expect_spectra_error_or
from _gguf_fixtures import encode, llama_meta, write_gguf
from hypothesis import given
from hypothesis import strategies as st

from spectra.errors import SpectraError
from spectra.formats.gguf import read_gguf
from spectra.sources.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int]:
    """A small llama GGUF (Q4_0 q and k with GQA, F32 norm): its bytes and header length."""
    rng = np.random.default_rng(0)
    path = write_gguf(
        tmp_path_factory.mktemp("fuzz") / "m.gguf",
        [
            ("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32), "F32"),
            ("blk.0.attn_q.weight", encode(rng.standard_normal((64, 64)), "Q4_0"), "Q4_0"),
            ("blk.0.attn_k.weight", encode(rng.standard_normal((32, 64)), "Q4_0"), "Q4_0"),
        ],
        ints=llama_meta(layers=1, hidden=64, heads=4, kv_heads=2, ffn=96, vocab=32),
    )
    return path.read_bytes(), read_gguf(path).data_start


def _open_read_all(path: Path) -> None:
    with Checkpoint.open(path) as ckpt:
        for m in ckpt.matrices():
            assert ckpt.read(m).shape == m.shape
        for t in ckpt.tensors():
            ckpt.read(t)


def _run(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    with ReadGuard.armed(path.parent) as outside, bounded_alloc(8 << 20):
        result = expect_spectra_error_or(_open_read_all, path)
    assert not outside, outside
    if isinstance(result, SpectraError):
        text = str(result)
        assert "\n" not in text and "\r" not in text and "\x1b" not in text, repr(text)


@pytest.mark.filterwarnings("ignore::spectra.sources.gguf.GgufPermutationWarning")
@FUZZ
@given(data=st.data())
def test_header_mutations(tmp_path: Path, valid: tuple[bytes, int], data: st.DataObject) -> None:
    blob, header_len = valid
    mutated = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, header_len - 1))
        width = data.draw(st.sampled_from((1, 4, 8)))
        special = st.sampled_from((0, 1, 2**31, 2**32 - 1, 2**62, 2**64 - 1))
        value = data.draw(
            st.one_of(
                st.binary(min_size=width, max_size=width),
                special.map(lambda v, w=width: v.to_bytes(8, "little")[:w]),
            )
        )
        mutated[at : at + width] = value[: len(mutated) - at]
    _run(tmp_path / "m.gguf", bytes(mutated))


@FUZZ
@given(cut=st.integers(0, 4000))
def test_truncations(tmp_path: Path, valid: tuple[bytes, int], cut: int) -> None:
    blob, _ = valid
    _run(tmp_path / "m.gguf", blob[: min(cut, len(blob) - 1)])
