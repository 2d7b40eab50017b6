"""Issue 14, case 9: the smaller ways a hostile or careless input still ended in exit 1 or
reached the terminal raw. Each ends in a one-line `SpectraError` (exit 2 in the CLI) now:

- layer/expert indices of thousands of digits (int()'s 4300-digit limit: ValueError);
- `lora_alpha` 1e308 or an int of 400 digits (OverflowError, an update of inf);
- paths longer than the file system allows (ENAMETOOLONG) and 200 KB error lines;
- escape sequences in `--out` and U+202E (right-to-left override) in tensor names;
- wrong-typed Python API arguments (TypeError/AttributeError before).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from _source_fixtures import write_lora_adapter, write_safetensors
from typer.testing import CliRunner

from spectra.cli._common import MAX_LINE, one_line, show_warning
from spectra.cli.main import app
from spectra.errors import SourceError, SpectraError, ValidationError

_RAW = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def assert_exit_2_one_line(result: Any, words: str = "") -> None:
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "internal error" not in text and "Traceback" not in text, text
    error_lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, text
    assert len(text) <= MAX_LINE + 200, len(text)
    assert words in text, text


@pytest.fixture
def model(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "m" / "model.safetensors"
    write_safetensors(
        path,
        {
            "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
            "model.layers.0.self_attn.v_proj.weight": torch.randn(16, 16, generator=g),
        },
    )
    return path.parent


# -- digits ------------------------------------------------------------------------------------
def test_layer_and_expert_indices_of_thousands_of_digits_are_no_index(tmp_path: Path) -> None:
    from spectra.sources.checkpoint import Checkpoint

    digits = "9" * 5000  # int() refuses more than 4300 digits: ValueError, exit 1 before
    path = write_safetensors(
        tmp_path / "a.safetensors",
        {
            f"model.layers.{digits}.self_attn.q_proj.weight": torch.ones(4, 4),
            f"model.layers.0.mlp.experts.{digits}.w1.weight": torch.ones(4, 4),
            "model.layers.123456789.self_attn.k_proj.weight": torch.ones(4, 4),
        },
    )
    with Checkpoint.open(path) as ckpt:
        found = {m.key[:40]: (m.layer, m.role) for m in ckpt.matrices()}
    assert sorted(found.values(), key=str) == sorted(
        [(None, "q"), (0, "gate"), (123456789, "k")], key=str
    ), found
    result = cli("inspect", str(path))
    assert result.exit_code == 0, result.output


# -- lora_alpha out of range (more cases in test_fuzz_adapter_config.py) ------------------
def test_lora_scale_refuses_an_overflowing_alpha() -> None:
    from spectra.formats.peft import MAX_LORA_ALPHA, lora_scale

    assert lora_scale(MAX_LORA_ALPHA, 4) == MAX_LORA_ALPHA / 4
    for alpha in (1e308, math.inf, math.nan, -1e7):
        with pytest.raises(ValidationError, match="LoRA alpha must be"):
            lora_scale(alpha, 4)


def test_compare_with_alpha_1e308_exits_2(model: Path, tmp_path: Path) -> None:
    folder = write_lora_adapter(
        tmp_path / "ad", {"model.layers.0.self_attn.q_proj.weight": (16, 16)}
    )
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(lora_alpha=1e308, rank_pattern={}, alpha_pattern={})
    (folder / "adapter_config.json").write_text(json.dumps(config))
    result = cli("compare", str(model), str(folder), "--out", str(tmp_path / "o"))
    assert_exit_2_one_line(result, "lora_alpha must be")


# -- long paths and long lines -----------------------------------------------------------------
def test_name_too_long_is_one_clipped_line(model: Path, tmp_path: Path) -> None:
    from spectra.sources.checkpoint import Checkpoint

    long = tmp_path / ("x" * 5000)
    with pytest.raises(SourceError, match="File name too long") as info:
        Checkpoint.open(long)
    assert len(str(info.value)) < 400
    assert_exit_2_one_line(cli("inspect", str(long)), "File name too long")
    assert_exit_2_one_line(
        cli("report", str(model), "--out", str(tmp_path / ("y" * 300)), "--no-cache"),
        "File name too long",
    )
    assert_exit_2_one_line(
        cli("compare", str(model), str(tmp_path / ("z" * 300)), "--out", str(tmp_path / "o")),
        "File name too long",
    )


def test_a_200_kb_error_line_is_clipped(model: Path, tmp_path: Path) -> None:
    """The message echoes the --include glob; it was printed whole (200 KB on one line)."""
    glob = "nomatch" + "x" * 200_000
    result = cli("report", str(model), "--include", glob, "--out", str(tmp_path / "o"))
    assert_exit_2_one_line(result, "characters cut")
    assert result.output.rstrip().endswith("inspect lists the matrices)"), result.output[-200:]


def test_one_line_keeps_head_and_tail() -> None:
    text = "a" * 5000 + " how to fix it"
    out = one_line(text)
    assert len(out) <= MAX_LINE and out.startswith("aaa") and out.endswith("how to fix it")
    assert one_line("x" * MAX_LINE) == "x" * MAX_LINE


# -- what reaches the terminal -----------------------------------------------------------------
def test_escape_sequences_in_out_do_not_reach_the_terminal(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "o\x1b]0;pwned\x07\x1b[2J\u202egnp.exe"
    result = cli("report", str(model), "--out", str(out), "--no-cache", "--format", "json")
    assert result.exit_code == 0, result.output
    assert (out / "metrics.json").is_file()
    assert not _RAW.search(result.output.replace("\n", "")), repr(result.output)


def test_bidi_override_in_names_does_not_reach_the_terminal(tmp_path: Path) -> None:
    path = write_safetensors(
        tmp_path / "m.safetensors",
        {"model.layers.0.self_attn.q_proj\u202ethgiew.weight": torch.ones(8, 8)},
    )
    result = cli("inspect", str(path))
    assert result.exit_code == 0, result.output
    assert "\u202e" not in result.output


def test_warnings_quoting_a_hostile_path_reach_the_terminal_clean(tmp_path: Path) -> None:
    """The leak that remained: Python's default `showwarning` printed a warning's text raw, and
    warnings quote paths (`IndexMismatchWarning` names the index). The `spectra` command prints
    each warning as one line through `one_line` (escape sequences, controls, bidi removed)."""
    import subprocess
    import sys

    from _source_fixtures import write_llama_like

    folder = write_llama_like(
        tmp_path / "m\x1b]0;pwned\x07\x1b[2J\u202egnp",
        layers=1,
        hidden=8,
        intermediate=16,
        vocab=10,
    )
    index = folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"].pop(sorted(doc["weight_map"])[0])  # the shards hold one more: a warning
    index.write_text(json.dumps(doc))
    run = subprocess.run(
        [sys.executable, "-m", "spectra", "inspect", str(folder), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "IndexMismatchWarning" in run.stderr, run.stderr
    assert not _RAW.search(run.stderr.replace("\n", "")), repr(run.stderr)


def test_warnings_are_printed_as_one_safe_line(capsys: pytest.CaptureFixture[str]) -> None:
    show_warning(
        UserWarning("a\nb\x1b[31m\u202ec" + "x" * 5000), UserWarning, "f.py", 1, None, None
    )
    err = capsys.readouterr().err
    assert err.startswith("UserWarning: a b") and not _RAW.search(err.replace("\n", ""))
    assert len(err.replace("\n", "")) <= MAX_LINE + 40


def test_html_and_markdown_drop_bidi_controls() -> None:
    from spectra.reports.html import esc, printable

    assert printable("q\u202eproj\u2066x\u200f") == "qprojx"
    assert "\u202e" not in str(esc("a\u202eb"))


# -- wrong-typed Python API arguments ----------------------------------------------------------
def _api_cases(model: Path, tmp_path: Path) -> dict[str, Any]:
    from spectra import AnalyzeOptions, Checkpoint, CompareOptions, analyze, compare, init_adapter
    from spectra.jobs.init import CalibrationRequest, InitOptions

    m = str(model)
    out = str(tmp_path / "o")
    return {
        "analyze(source=123)": lambda: analyze(123),
        "analyze(options=dict)": lambda: analyze(m, {"roles": ["q"]}),
        "analyze(cache=123)": lambda: analyze(m, cache=123),
        "analyze(progress=1)": lambda: analyze(m, progress=1, cache=False),
        "compare(base=123)": lambda: compare(123, m),
        "compare(options=1)": lambda: compare(m, m, 1),
        "init_adapter(source=123)": lambda: init_adapter(123, InitOptions(out=out)),
        "init_adapter(options=None)": lambda: init_adapter(m, None),
        "Checkpoint.open(123)": lambda: Checkpoint.open(123),
        "Checkpoint.open(None)": lambda: Checkpoint.open(None),
        "InitOptions(rank='8')": lambda: InitOptions(out=out, rank="8"),
        "InitOptions(rank=None)": lambda: InitOptions(out=out, rank=None),
        "InitOptions(targets=None)": lambda: InitOptions(out=out, targets=None),
        "InitOptions(targets=[1])": lambda: InitOptions(out=out, targets=[1]),
        "InitOptions(alpha='x')": lambda: InitOptions(out=out, alpha="x"),
        "InitOptions(alpha=10**400)": lambda: InitOptions(out=out, alpha=10**400),
        "InitOptions(ranks=[1])": lambda: InitOptions(out=out, ranks=[1]),
        "InitOptions(out=None)": lambda: InitOptions(out=None),
        "InitOptions(seed=1.5)": lambda: InitOptions(out=out, seed=1.5),
        "CalibrationRequest(samples='8')": lambda: CalibrationRequest(samples="8"),
        "CalibrationRequest(rho=None)": lambda: CalibrationRequest(rho=None),
        "AnalyzeOptions(include=None)": lambda: AnalyzeOptions(include=None),
        "AnalyzeOptions(roles=[1])": lambda: AnalyzeOptions(roles=[1]),
        "AnalyzeOptions(outlier_multiplier='8')": lambda: AnalyzeOptions(outlier_multiplier="8"),
        "AnalyzeOptions(seed=None)": lambda: AnalyzeOptions(seed=None),
        "AnalyzeOptions(device=1)": lambda: AnalyzeOptions(device=1),
        "CompareOptions(k=None)": lambda: CompareOptions(k=None),
        "CompareOptions(map=None)": lambda: CompareOptions(map=None),
        "CompareOptions(map=[1])": lambda: CompareOptions(map=[1]),
        "CompareOptions(include=1.5)": lambda: CompareOptions(include=1.5),
        "CompareOptions(unchanged_tol=None)": lambda: CompareOptions(unchanged_tol=None),
        "CompareOptions(allow_missing='no')": lambda: CompareOptions(allow_missing="no"),
    }


def test_wrong_typed_api_arguments_are_validation_errors(model: Path, tmp_path: Path) -> None:
    """Before: TypeError or AttributeError from inside the job for each of these."""
    wrong = {}
    for name, call in _api_cases(model, tmp_path).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                call()
            except SpectraError as exc:
                assert "\n" not in str(exc) and len(str(exc)) < 400, (name, str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                wrong[name] = f"{type(exc).__name__}: {exc}"
                continue
        wrong[name] = "no error"
    assert not wrong, wrong


def test_right_typed_api_arguments_still_work(model: Path, tmp_path: Path) -> None:
    from spectra import AnalyzeOptions, CompareOptions, analyze
    from spectra.jobs.init import InitOptions

    opts = AnalyzeOptions(include="model.*", roles=["q"], device=torch.device("cpu"))
    assert opts.include == ("model.*",) and opts.roles == ("q",) and opts.device == "cpu"
    an = analyze(model, opts, cache=False)
    assert an is not None and [lm.key for lm in an.layers] == [
        "model.layers.0.self_attn.q_proj.weight"
    ]
    cmp = CompareOptions(k=3, map=["a=>b", ("c", "d")], roles="q", epsilons=[0.5])
    assert cmp.map == (("a", "b"), ("c", "d")) and cmp.roles == ("q",)
    init = InitOptions(out=tmp_path / "o", rank=4, targets=("q", "v"), alpha=8, ranks={"x": 2})
    assert init.rank == 4 and init.alpha == 8
