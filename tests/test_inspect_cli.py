"""`spectra inspect` through typer's CliRunner: table, JSON, filters, escaping, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _source_fixtures import write_gpt2_like, write_llama_like, write_safetensors
from typer.testing import CliRunner

from spectra.cli._common import console
from spectra.cli.main import app


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensor names fold at 80 columns; a wide console keeps each on one line for asserts."""
    monkeypatch.setattr(console, "_width", 200)


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_inspect_bundled_minilm_json() -> None:
    code, out = _run("inspect", "--json")
    assert code == 0, out
    data = json.loads(out)
    mats = data["matrices"]
    assert len(mats) == data["totals"]["count"] == 40
    assert data["totals"]["parameters"] == sum(m["parameters"] for m in mats)
    assert data["totals"]["bytes"] == 4 * data["totals"]["parameters"]  # F32
    assert data["totals"]["by_role"]["q"] == {
        "count": 6,
        "parameters": 6 * 384 * 384,
        "bytes": 6 * 384 * 384 * 4,
    }
    assert sum(r["count"] for r in data["totals"]["by_role"].values()) == 40


def test_inspect_table_and_filters(tmp_path: Path) -> None:
    folder = write_llama_like(tmp_path / "m", layers=2, hidden=64, intermediate=128)
    code, out = _run("inspect", str(folder), "--roles", "q,down", "--exclude", "*layers.1.*")
    assert code == 0, out
    assert "q_proj" in out and "down_proj" in out and "k_proj" not in out
    assert "64 x 128" in out  # down (out, in)
    assert "BF16" in out and "totals" in out
    code, out = _run("inspect", str(folder), "--json", "--include", "*.mlp.*")
    assert {m["role"] for m in json.loads(out)["matrices"]} == {"gate", "up", "down"}


def test_inspect_gpt2_shows_transposed_shape(tmp_path: Path) -> None:
    path = write_gpt2_like(tmp_path / "g", hidden=32)
    code, out = _run("inspect", str(path), "--json", "--roles", "qkv")
    m = json.loads(out)["matrices"][0]
    assert (m["shape"], m["stored_shape"], m["transpose"]) == ([96, 32], [32, 96], True)


def test_names_are_escaped_and_control_chars_stripped(tmp_path: Path) -> None:
    t = {"x[bold]y.weight": torch.zeros(4, 4), "a\x1b[31mred.weight": torch.zeros(4, 4)}
    path = write_safetensors(tmp_path / "w.safetensors", t)
    code, out = _run("inspect", str(path))
    assert code == 0, out
    assert "x[bold]y.weight" in out
    assert "\x1b[31m" not in out and "a?[31mred.weight" in out


def test_bad_inputs_exit_2_one_line(tmp_path: Path) -> None:
    code, out = _run("inspect", str(tmp_path / "nope"))
    assert code == 2 and "no such file or folder" in out and "Traceback" not in out
    (tmp_path / "model.bin").write_bytes(b"junk")
    code, out = _run("inspect", str(tmp_path / "model.bin"))
    assert code == 2 and "refusing a pickled checkpoint" in out
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    code, out = _run("inspect", str(bad))
    assert code == 2 and "invalid header JSON" in out
    code, out = _run("inspect", "--roles", "attention")
    assert code == 2 and "unknown role" in out
