"""`spectra convert` against hostile adapter and manifest inputs (issue 14, case 8): each ends
in a one-line SpectraError (exit 2 in the CLI), never an internal error. Before: garbage and
truncated safetensors (SafetensorError), a manifest that is a list (AttributeError), deeply
nested (RecursionError), non-UTF-8 (UnicodeDecodeError) or holds a 5000-digit number (ValueError)
were internal errors (exit 1)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _source_fixtures import write_lora_adapter
from typer.testing import CliRunner

from spectra.cli.main import app
from spectra.errors import SpectraError
from spectra.jobs.convert import convert_to_lora

SHAPES = {"layers.0.q_proj.weight": (8, 6), "layers.0.v_proj.weight": (8, 6)}


def _pair(root: Path) -> tuple[Path, Path]:
    init, trained = root / "init", root / "trained"
    write_lora_adapter(init / "adapter", SHAPES, r=4, seed=1)
    manifest = {"kind": "init", "method": "pissa", "source": "base"}
    (init / "spectra.json").write_text(json.dumps(manifest))
    write_lora_adapter(trained, SHAPES, r=4, seed=2)
    return init, trained


def _config(cfg: dict) -> Callable[[Path, Path], object]:
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
    return lambda i, t: (t / "adapter_config.json").write_text(json.dumps(base | cfg))


def _weights(i: Path, t: Path) -> Path:
    return t / "adapter_model.safetensors"


CASES: dict[str, Callable[[Path, Path], object]] = {
    "config is a list": lambda i, t: (t / "adapter_config.json").write_text("[1, 2]"),
    "config nested 100000 deep": lambda i, t: (t / "adapter_config.json").write_text("[" * 10**5),
    "config not UTF-8": lambda i, t: (t / "adapter_config.json").write_bytes(b'{"r": "\xff"}'),
    "config 5000-digit r": lambda i, t: (t / "adapter_config.json").write_text(
        '{"r": ' + "9" * 5000 + "}"
    ),
    "invalid alpha_pattern regex": _config({"alpha_pattern": {"(": 2}}),
    "alpha_pattern bomb": _config({"alpha_pattern": {"(.|.)*Z": 2}}),
    "rank_pattern bomb": _config({"rank_pattern": {".*.*.*.*.*.*.*.*X": 4}}),
    "DoRA": _config({"use_dora": True}),
    "garbage safetensors": lambda i, t: _weights(i, t).write_bytes(b"garbage" * 10),
    "header length only": lambda i, t: _weights(i, t).write_bytes(b"\xff" * 8),
    "truncated header": lambda i, t: _weights(i, t).write_bytes(_weights(i, t).read_bytes()[:100]),
    "truncated data": lambda i, t: _weights(i, t).write_bytes(_weights(i, t).read_bytes()[:-20]),
    "empty safetensors": lambda i, t: _weights(i, t).write_bytes(b""),
    "init garbage safetensors": lambda i, t: (
        i / "adapter" / "adapter_model.safetensors"
    ).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "),
    "manifest is a list": lambda i, t: (i / "spectra.json").write_text("[1]"),
    "manifest nested": lambda i, t: (i / "spectra.json").write_text('{"a":' * 10**5),
    "manifest not UTF-8": lambda i, t: (i / "spectra.json").write_bytes(b'{"kind": "\xff"}'),
    "manifest 5000-digit number": lambda i, t: (i / "spectra.json").write_text(
        '{"kind": "init", "source": ' + "9" * 5000 + "}"
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_one_line_error(tmp_path: Path, case: str) -> None:
    init, trained = _pair(tmp_path)
    CASES[case](init, trained)
    t0 = time.perf_counter()
    with pytest.raises(SpectraError) as err:
        convert_to_lora(init, trained, tmp_path / "out")
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 1500, msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["garbage safetensors", "manifest is a list"])
def test_cli_exit_2(tmp_path: Path, case: str) -> None:
    init, trained = _pair(tmp_path)
    CASES[case](init, trained)
    args = ["convert", "--init", str(init), "--trained", str(trained), "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "internal error" not in res.output and res.output.count("\n") == 1, res.output


def test_the_untouched_pair_converts(tmp_path: Path) -> None:
    """Control: the same folders, unharmed, convert."""
    init, trained = _pair(tmp_path)
    assert (convert_to_lora(init, trained, tmp_path / "out") / "adapter_config.json").is_file()
