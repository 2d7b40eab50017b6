"""Calibration text for data-driven initializers (CorDA, EVA).

Three sources, one result (a list of non-empty strings):

- a plain text file, one sample per line (blank lines are skipped);
- a JSONL file (``.jsonl`` / ``.ndjson``), one JSON object per line, the sample in a named field
  (``text`` by default);
- the built-in default corpus (``spectra/adapt/data/default_corpus.txt``, about 200 English
  sentences written for this project), used when no file is given. It is small on purpose: enough
  for demos and tests, not a substitute for data from the task you will fine-tune on.

>>> texts = load_texts(None, samples=4)
>>> len(texts)
4
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from spectra.errors import SourceError, ValidationError
from spectra.formats.files import MAX_TEXT_BYTES, read_text_input

JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEFAULT_CORPUS = "default_corpus.txt"


def default_corpus() -> list[str]:
    """The built-in calibration sentences, in file order."""
    text = resources.files("spectra.adapt").joinpath("data", DEFAULT_CORPUS).read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_texts(
    path: str | Path | None,
    *,
    samples: int | None = None,
    text_field: str = "text",
) -> list[str]:
    """Read calibration samples from `path` (text or JSONL) or the default corpus when None.

    Args:
        path: a ``.txt``-like file (one sample per line) or a ``.jsonl``/``.ndjson`` file.
        samples: keep the first `samples` samples (None: all). Must be >= 1.
        text_field: the JSONL field that holds the text.

    Raises:
        ValidationError: missing/unreadable file, malformed JSONL line, missing field, no samples.
    """
    if samples is not None and samples < 1:
        raise ValidationError(f"samples must be >= 1, got {samples}")
    if path is None:
        texts = default_corpus()
    else:
        texts = _read_file(Path(path), text_field)
    if not texts:
        raise ValidationError(f"calibration file {path} holds no non-empty sample")
    return texts[:samples] if samples is not None else texts


def _read_file(path: Path, text_field: str) -> list[str]:
    if not path.exists():  # a FIFO or a device exists: refused by read_text_input
        raise ValidationError(
            f"calibration file {path} does not exist: pass a text file (one sample per line) "
            "or a JSONL file, or omit --calib to use the built-in corpus"
        )
    try:
        lines = read_text_input(path, MAX_TEXT_BYTES, "calibration file").splitlines()
    except SourceError as exc:
        raise ValidationError(str(exc)) from None
    if path.suffix.lower() in JSONL_SUFFIXES:
        return _parse_jsonl(lines, path, text_field)
    return [line.strip() for line in lines if line.strip()]


def _parse_jsonl(lines: list[str], path: Path, text_field: str) -> list[str]:
    texts: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _json_line(line, path, number)
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValidationError(
                f"{path}:{number}: no field {text_field!r} (found {keys}); "
                "choose the field with --text-field"
            )
        value = record[text_field]
        if not isinstance(value, str):
            raise ValidationError(
                f"{path}:{number}: field {text_field!r} is {type(value).__name__}, not a string"
            )
        if value.strip():
            texts.append(value.strip())
    return texts


def _json_line(line: str, path: Path, number: int) -> object:
    """One JSONL record; every way a hostile line can fail is one line naming file and line:
    malformed JSON, nesting deeper than the parser's recursion limit (RecursionError), an
    integer over Python's digit limit (ValueError)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
    except RecursionError as exc:
        raise ValidationError(f"{path}:{number}: JSON nested too deeply to read") from exc
    except ValueError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValidationError(f"{path}:{number}: JSON value not readable ({reason})") from exc
