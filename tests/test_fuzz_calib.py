"""Fuzzing calibration text files (`spectra.adapt.calib_data.load_texts`): random bytes, text and
JSONL files with hostile records. Each case is a `ValidationError` naming the file, or a list of
non-empty, stripped strings that are exactly the file's samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _fuzz_helpers import FUZZ, ReadGuard, hostile_text
from hypothesis import given
from hypothesis import strategies as st

from spectra.adapt.calib_data import load_texts
from spectra.errors import SpectraError, ValidationError


def _load(path: Path, **kwargs: Any) -> list[str] | SpectraError:
    with ReadGuard.armed(path.parent) as outside:
        try:
            result: list[str] | SpectraError = load_texts(path, **kwargs)
        except SpectraError as exc:
            result = exc
    assert not outside, outside
    if isinstance(result, SpectraError):
        assert isinstance(result, ValidationError)
        assert str(path) in str(result)
    return result


@FUZZ
@given(blob=st.binary(max_size=300), suffix=st.sampled_from([".txt", ".jsonl", ".ndjson", ""]))
def test_random_bytes(tmp_path_factory: pytest.TempPathFactory, blob: bytes, suffix: str) -> None:
    path = tmp_path_factory.mktemp("cal") / f"calib{suffix}"
    path.write_bytes(blob)
    result = _load(path)
    if isinstance(result, list):
        assert result and all(isinstance(t, str) and t and t == t.strip() for t in result)


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), hostile_text)
records = st.one_of(
    st.fixed_dictionaries({"text": st.one_of(hostile_text, json_scalars)}),
    st.dictionaries(hostile_text, json_scalars, max_size=3),
    st.lists(json_scalars, max_size=3),
    json_scalars,
)


@FUZZ
@given(rows=st.lists(records, min_size=1, max_size=6), samples=st.integers(1, 4))
def test_jsonl_records(
    tmp_path_factory: pytest.TempPathFactory, rows: list[Any], samples: int
) -> None:
    path = tmp_path_factory.mktemp("cal") / "calib.jsonl"
    path.write_text(
        "\n".join(json.dumps(r) for r in rows), encoding="utf-8", errors="surrogatepass"
    )
    result = _load(path, samples=samples)
    valid = all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in rows)
    if isinstance(result, list):
        want = [r["text"].strip() for r in rows if r["text"].strip()][:samples]
        assert valid and result == want
    elif valid and any(r["text"].strip() for r in rows):
        pytest.fail(f"valid JSONL refused: {result}")


@pytest.mark.parametrize(
    "line",
    ["[" * 100_000, '{"text": "a", "n": ' + "9" * 5000 + "}"],
    ids=["deep-nesting", "5000-digit-int"],
)
def test_hostile_jsonl_line_is_a_validation_error(tmp_path: Path, line: str) -> None:
    path = tmp_path / "calib.jsonl"
    path.write_text('{"text": "fine"}\n' + line)
    with pytest.raises(ValidationError) as caught:
        load_texts(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:2: ") and "\n" not in message and len(message) < 300


def test_directory_and_missing_file(tmp_path: Path) -> None:
    assert isinstance(_load(tmp_path), ValidationError)
    assert isinstance(_load(tmp_path / "nope.txt"), ValidationError)
