"""`spectra plan` on the command line: help that teaches every kind, one-line errors (exit 2)
for bad inputs before any work, a plan written and reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spectra.cli.main import app
from spectra.jobs.plan import KINDS


def _run(*args: str):  # noqa: ANN202
    return CliRunner().invoke(app, list(args))


def test_help_teaches_each_kind() -> None:
    result = _run("plan", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for kind in KINDS:
        assert f"--for {kind}:" in text
    for option in ("--fraction", "--activated-layers", "--sparsity", "--epsilon", "--layers"):
        assert option in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--for", "nope"], "unknown kind 'nope': choose one of peft, spectrum"),
        (["--for", "spectrum", "--fraction", "1.5"], "fraction must be in (0, 1], got 1.5"),
        (["--for", "kappa", "--fraction", "0"], "fraction must be in (0, 1], got 0.0"),
        (["--for", "alphapruning", "--sparsity", "1"], "sparsity must be in (0, 1), got 1.0"),
        (["--for", "alphapruning", "--epsilon", "-0.1"], "epsilon must be in [0, 1)"),
        (["--for", "alphapruning", "--mapping", "x"], "unknown mapping 'x'"),
        (["--for", "alphapruning", "--metric", "x"], "unknown metric 'x'"),
        (["--for", "owlore", "--outlier-multiplier", "0"], "outlier multiplier must be > 0"),
        (["--for", "lisa", "--activated-layers", "0"], "activated_layers must be >= 1"),
        (["--for", "peft", "--layers", "3-1"], "--layers range '3-1'"),
        (["--for", "peft", "--layers", "a"], "--layers 'a': give indices"),
        (["--for", "peft", "--budget", "9"], "--budget needs --allocate"),
        (["--for", "peft", "--allocate", "zzz"], "unknown allocator 'zzz'"),
        (["--for", "lisa", "--no-cache", "--cache-dir", "x"], "contradict"),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = _run("plan", *args, "--out", str(tmp_path / "p.json"))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0]
    assert not (tmp_path / "p.json").exists()


def test_existing_output_needs_force(minilm_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "lisa.json"
    out.write_text("keep")
    result = _run("plan", str(minilm_path), "--for", "lisa", "--out", str(out), "--no-cache")
    assert result.exit_code == 2
    assert "exists: pass --force" in result.output and out.read_text() == "keep"
    result = _run(
        "plan", str(minilm_path), "--for", "lisa", "--out", str(out), "--no-cache", "--force"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["kind"] == "lisa"
    assert "lisa plan: 6 chosen; wrote" in result.output
    assert not list(tmp_path.glob(".*tmp*"))


def test_output_may_not_replace_the_source(minilm_path: Path, tmp_path: Path) -> None:
    source = tmp_path / "model.safetensors"
    source.write_bytes((minilm_path / "model.safetensors").read_bytes())
    result = _run("plan", str(source), "--for", "lisa", "--out", str(source), "--force")
    assert result.exit_code == 2
    assert "would replace an input" in result.output
    assert source.stat().st_size == (minilm_path / "model.safetensors").stat().st_size


@pytest.mark.parametrize("kind", ["kappa", "lisa"])
def test_html_page_shows_the_plan(minilm_path: Path, tmp_path: Path, kind: str) -> None:
    out, page = tmp_path / "p.json", tmp_path / "p.html"
    args = ["plan", str(minilm_path), "--for", kind, "--out", str(out), "--html", str(page)]
    result = _run(*args, "--cache-dir", str(tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    text = page.read_text()
    assert "Content-Security-Policy" in text and "<script" not in text
    if kind == "kappa":
        for row in plan["modules"]:
            assert row["module"] in text
        assert text.count(">chosen</span>") == len(plan["target_modules"])
    else:
        assert text.count("<tr>") == 1 + plan["num_layers"]  # header + one row per layer
    again = _run(*args, "--no-cache")
    assert again.exit_code == 2 and "exists: pass --force" in again.output


def test_an_adapter_is_refused(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file(
        {"base_model.model.q.lora_A.weight": torch.zeros(2, 4)}, str(tmp_path / "a.safetensors")
    )
    result = _run(
        "plan", str(tmp_path / "a.safetensors"), "--for", "kappa", "--out", str(tmp_path / "x.json")
    )
    assert result.exit_code == 2 and "holds PEFT LoRA factors" in result.output
