"""Fuzzing the safetensors header parser and the reader with hostile files.

Every case ends in a `SpectraError` whose message is one line without raw control characters, or
in a correct result: every tensor read back equals the bytes of its range in the file (checked
against an independent slice of the file, and against the reference `safetensors` reader when it
accepts the file too). Every case runs with file opens confined to its folder (audit hook) and a
Python-heap bound far below what the hostile headers claim.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from _fuzz_helpers import (
    FUZZ,
    HOSTILE_NAMES,
    ReadGuard,
    bounded_alloc,
    expect_spectra_error_or,
    header_bytes,
    hostile_text,
    raw_safetensors,
    write_raw,
)
from hypothesis import given
from hypothesis import strategies as st

from spectra.errors import SourceError, SpectraError
from spectra.formats.safetensors import DTYPES, MAX_HEADER_BYTES
from spectra.sources.checkpoint import Checkpoint

DTYPE_NAMES = sorted(DTYPES)
TiB = 1 << 40


def _raw_bytes(t: torch.Tensor) -> bytes:
    flat = t.contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes()) if flat.numel() else b""


def _check_message(err: SpectraError) -> None:
    msg = str(err)
    assert "\n" not in msg and "\x1b" not in msg and "\r" not in msg, repr(msg)


def open_and_read(path: Path) -> Checkpoint | SpectraError:
    """Open `path`, read every tensor and matrix, check each against the file's bytes."""
    blob = path.read_bytes()
    limit = 8 * 1024 * 1024 + 64 * len(blob)
    with ReadGuard.armed(path.parent) as outside, bounded_alloc(limit):
        result = expect_spectra_error_or(_open_read_all, path, blob)
    assert not outside, f"read outside the checkpoint folder: {outside}"
    if isinstance(result, SpectraError):
        _check_message(result)
    return result


def _open_read_all(path: Path, blob: bytes) -> Checkpoint:
    with Checkpoint.open(path) as ckpt:
        for ref in ckpt.tensors():
            assert 0 <= ref.offset <= ref.offset + ref.nbytes <= len(blob)
            raw = ckpt.read(ref, dtype=None)
            assert tuple(raw.shape) == ref.shape
            assert _raw_bytes(raw) == blob[ref.offset : ref.offset + ref.nbytes]
        for m in ckpt.matrices():
            w = ckpt.read(m)
            assert tuple(w.shape) == m.shape and w.dtype == torch.float32
    return ckpt


def _reference_agrees(path: Path, ckpt: Checkpoint) -> None:
    """When the reference reader accepts the file too, it must see the same tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as ref:
            names = set(ref.keys())
            expected = {n: ref.get_tensor(n) for n in names}
    except Exception:  # noqa: BLE001 - the reference refusing is not our concern here
        return
    assert names == {t.name for t in ckpt.tensors()}
    with Checkpoint.open(path) as again:
        for name, tensor in expected.items():
            ours = again.read(name, dtype=None)
            assert _raw_bytes(ours) == _raw_bytes(tensor)


# -- well-formed files with hostile names, then mutated --------------------------------------
@st.composite
def tensor_specs(draw: st.DrawFn) -> list[tuple[str, str, list[int]]]:
    names = draw(st.lists(hostile_text, min_size=1, max_size=5, unique=True))
    specs = []
    for name in names:
        if name == "__metadata__":
            continue
        dtype = draw(st.sampled_from(DTYPE_NAMES))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        specs.append((name, dtype, shape))
    return specs


def build_file(
    specs: list[tuple[str, str, list[int]]], metadata: dict[str, str], data_seed: int
) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    pos = 0
    for name, dtype, shape in specs:
        n = math.prod(shape) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    gen = torch.Generator().manual_seed(data_seed)
    data = _raw_bytes(torch.randint(0, 256, (pos,), dtype=torch.uint8, generator=gen))
    return raw_safetensors(header_bytes(header), data)


MUTATIONS = ("none", "flip", "truncate", "length", "append", "splice")


def mutate(blob: bytes, kind: str, pos: int, value: int) -> bytes:
    """One mutation at relative position `pos` (0..1e6) with a free integer `value`."""
    at = pos * len(blob) // 1_000_000
    if kind == "flip":
        b = bytearray(blob)
        b[min(at, len(b) - 1)] ^= 1 << (value % 8)
        return bytes(b)
    if kind == "truncate":
        return blob[:at]
    if kind == "length":
        return struct.pack("<Q", value % (1 << 64)) + blob[8:]
    if kind == "append":
        return blob + bytes([value % 256]) * (value % 17)
    if kind == "splice":  # a byte of the JSON replaced by a structural character
        b = bytearray(blob)
        b[min(max(at, 8), len(b) - 1)] = b'{}[]",:0-9e'[value % 11]
        return bytes(b)
    return blob


@FUZZ
@given(
    specs=tensor_specs(),
    metadata=st.dictionaries(hostile_text, hostile_text, max_size=3),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(MUTATIONS),
    pos=st.integers(0, 1_000_000),
    value=st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 8, 2**63, TiB])),
)
def test_mutated_files(
    tmp_path_factory: pytest.TempPathFactory,
    specs: list[tuple[str, str, list[int]]],
    metadata: dict[str, str],
    seed: int,
    kind: str,
    pos: int,
    value: int,
) -> None:
    folder = tmp_path_factory.mktemp("mut")
    path = write_raw(
        folder / "model.safetensors", mutate(build_file(specs, metadata, seed), kind, pos, value)
    )
    result = open_and_read(path)
    if kind == "none":
        assert isinstance(result, Checkpoint), result
        assert result.metadata == metadata
    if isinstance(result, Checkpoint):
        _reference_agrees(path, result)


# -- structurally random headers ------------------------------------------------------------
ints = st.one_of(
    st.integers(-3, 64),
    st.sampled_from([2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64, 2**64 + 7, TiB]),
)
json_scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(), hostile_text)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text, inner, max_size=3),
    max_leaves=12,
)
entry = st.one_of(
    st.fixed_dictionaries(
        {
            "dtype": st.one_of(
                st.sampled_from(DTYPE_NAMES + ["F4", "bf16", "U128", ""]), json_scalars
            ),
            "shape": st.one_of(st.lists(ints, max_size=4), json_values),
            "data_offsets": st.one_of(st.lists(ints, min_size=2, max_size=2), json_values),
        }
    ),
    json_values,
)


@FUZZ
@given(
    header=st.dictionaries(st.one_of(hostile_text, st.just("__metadata__")), entry, max_size=4),
    data=st.binary(max_size=256),
)
def test_random_headers(
    tmp_path_factory: pytest.TempPathFactory, header: dict[str, Any], data: bytes
) -> None:
    folder = tmp_path_factory.mktemp("rnd")
    text = json.dumps(header, allow_nan=True).encode()
    path = write_raw(folder / "model.safetensors", raw_safetensors(text, data))
    result = open_and_read(path)
    if isinstance(result, Checkpoint):
        _reference_agrees(path, result)


# -- targeted hostile cases -----------------------------------------------------------------
def _one(dtype: str, shape: list[int], offsets: list[int], data: bytes = b"") -> bytes:
    body = {"t.weight": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}
    return raw_safetensors(header_bytes(body), data)


CASES: dict[str, tuple[bytes, str]] = {
    "terabyte claim": (_one("F32", [1 << 19, 1 << 19], [0, 4 << 38]), "exceeds the file"),
    "product overflows int64": (
        _one("BF16", [2**40, 2**40], [0, 2 * 2**80]),
        "int64|needs",
    ),
    "zero dim hides an int64 overflow": (_one("F32", [0, 2**64], [0, 0]), "shape"),
    "zero dim with stride overflow": (_one("F32", [0, 2**62, 4], [0, 0]), "shape"),
    "offsets out of range": (_one("F32", [2], [100, 108], b"\0" * 8), "exceeds the file"),
    "offsets reversed": (_one("F32", [0], [8, 0], b"\0" * 8), "data_offsets"),
    "negative offset": (_one("F32", [2], [-8, 0], b"\0" * 8), "data_offsets"),
    "unknown dtype": (_one("F128", [1], [0, 16], b"\0" * 16), "unknown dtype"),
    "float shape": (_one("F32", [2.0], [0, 8], b"\0" * 8), "shape"),
    "bool shape": (_one("F32", [True], [0, 4], b"\0" * 4), "shape"),
    "header length beyond file": (raw_safetensors(b"{}", hlen=10**12), "larger than the file"),
    "header length is u64 max": (raw_safetensors(b"{}", hlen=2**64 - 1), "larger than the file"),
    "non-UTF-8 name": (
        raw_safetensors(
            b'{"\xff\xfe.weight": {"dtype":"F32","shape":[],"data_offsets":[0,4]}}', b"\0" * 4
        ),
        "UTF-8",
    ),
    "deeply nested JSON": (raw_safetensors(b"[" * 200_000), "JSON"),
    "integer with 5000 digits": (
        raw_safetensors(
            b'{"t": {"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}'
        ),
        "JSON",
    ),
    "NaN offset": (
        raw_safetensors(b'{"t": {"dtype":"F32","shape":[1],"data_offsets":[NaN,4]}}'),
        "data_offsets",
    ),
    "header is a list": (raw_safetensors(b"[1, 2]"), "must be an object"),
    "duplicate name": (
        raw_safetensors(
            b'{"a": {"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
            b'"a": {"dtype":"U8","shape":[1],"data_offsets":[1,2]}}',
            b"\0\0",
        ),
        "twice",
    ),
    "metadata not strings": (raw_safetensors(b'{"__metadata__": {"a": 1}}'), "__metadata__"),
    "empty file": (b"", "truncated"),
    "seven bytes": (b"\x02\0\0\0\0\0\0", "truncated"),
}


def _overlap() -> bytes:
    body = {
        "a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]},
    }
    return raw_safetensors(header_bytes(body), b"\0" * 24)


CASES["overlapping tensors"] = (_overlap(), "overlaps")
CASES["a million 1x1 experts"] = (
    raw_safetensors(
        header_bytes(
            {
                "model.layers.0.mlp.experts.down_proj": {
                    "dtype": "F8_E4M3",
                    "shape": [1 << 20, 1, 1],
                    "data_offsets": [0, 1 << 20],
                }
            }
        ),
        b"\0" * (1 << 20),
    ),
    "experts",
)
CASES["megabyte shape echoed"] = (_one("F32", ["x" * 100] * 10_000, [0, 4]), "shape")
CASES["megabyte name"] = (
    raw_safetensors(header_bytes({"n" * 1_000_000: {"dtype": "F9"}})),
    "unknown dtype",
)
HEADER_CAP = raw_safetensors(b" " * 16, hlen=MAX_HEADER_BYTES + 1) + b" " * (MAX_HEADER_BYTES + 1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_cases(tmp_path: Path, case: str) -> None:
    blob, words = CASES[case]
    path = write_raw(tmp_path / "model.safetensors", blob)
    result = open_and_read(path)
    assert isinstance(result, SourceError), f"{case}: accepted"
    assert str(path) in str(result)
    assert len(str(result)) < 500 + len(str(path))
    assert re.search(words, str(result)), str(result)


def test_header_size_cap_reads_nothing_big(tmp_path: Path) -> None:
    """A header just over the cap is refused after reading 8 bytes (the file is sparse)."""
    path = tmp_path / "model.safetensors"
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        fh.truncate(8 + MAX_HEADER_BYTES + 1 + 16)
    with bounded_alloc(1 << 20), pytest.raises(SourceError, match="exceeds"):
        Checkpoint.open(path)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_round_trip(tmp_path: Path, name: str) -> None:
    """Names and metadata are data: listed exactly as written, never interpreted as paths."""
    if name == "":
        name = " "
    if "\ud800" in name:  # lone surrogate: refused, as the reference reader does
        blob = raw_safetensors(
            header_bytes({name: {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}), b"\0" * 4
        )
        refused = open_and_read(write_raw(tmp_path / "s" / "model.safetensors", blob))
        assert isinstance(refused, SourceError) and "not valid Unicode" in str(refused)
        return
    body = {
        "__metadata__": {"note": name, name: "<b>x</b>"},
        name: {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
    }
    data = struct.pack("<2f", 1.5, -2.0)
    path = write_raw(
        tmp_path / "m" / "model.safetensors", raw_safetensors(header_bytes(body), data)
    )
    result = open_and_read(path)
    assert isinstance(result, Checkpoint), result
    assert [t.name for t in result.tensors()] == [name]
    assert result.metadata == {"note": name, name: "<b>x</b>"}
    with Checkpoint.open(path) as ckpt:
        assert ckpt.read(name).tolist() == [[1.5, -2.0]]


def test_dtype_name_of_is_the_reverse_of_the_dtype_table() -> None:
    """Every safetensors dtype this torch has maps back to its own name; a dtype the format
    cannot store (complex128) is refused."""
    from spectra.formats.safetensors import DTYPES, dtype_name_of

    for name, dtype in DTYPES.items():
        if dtype.torch_dtype is not None:
            assert dtype_name_of(dtype.torch_dtype) == name
    with pytest.raises(ValueError, match="complex128"):
        dtype_name_of(torch.complex128)
