"""What the CLI costs before and around the work (issue 19): the modules `--help` and `inspect`
import, the thread count every command runs with, progress lines off a terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _source_fixtures import write_llama_like
from typer.testing import CliRunner

from spectra.cli import _common as C
from spectra.cli.main import app

_IMPORTS = """
import sys
from spectra.cli.main import app
try:
    app(sys.argv[1:])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
print("LOADED", sorted({m.split(".")[0] for m in sys.modules}))
"""


def _top_modules(*argv: str) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORTS, *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("LOADED"))
    return set(eval(line.removeprefix("LOADED ")))  # a list literal of module names


def test_help_imports_nothing_heavy() -> None:
    loaded = _top_modules("--help")
    assert "typer" in loaded  # the probe sees what the command imported
    assert not loaded & {"torch", "numpy", "matplotlib", "scipy", "transformers", "safetensors"}


# what a headers-only command must never import: `inspect` reads JSON headers, nothing else
HEAVY = {"torch", "numpy", "matplotlib", "scipy", "transformers", "peft", "weightwatcher"}


def _imported_by_command(*argv: str) -> set[str]:
    """Top-level modules the real entry point (`python -X importtime -m spectra ARGV`) imported,
    read from its import-time log (one line per module, the name last)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "spectra", *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("import time:")]
    return {ln.rsplit("|", 1)[1].strip().split(".")[0] for ln in lines[1:]}  # [0]: the header


def test_inspect_of_the_bundled_model_imports_no_torch() -> None:
    loaded = _imported_by_command("inspect")  # no SOURCE: the bundled MiniLM
    assert {"spectra", "typer", "rich"} <= loaded  # the log holds the command's imports
    assert not loaded & HEAVY
    assert not _imported_by_command("inspect", "--json") & HEAVY


def test_inspect_of_quantized_and_gguf_files_imports_no_torch(tmp_path: Path) -> None:
    import torch
    from _gguf_fixtures import llama_weights, tiny_llama_gguf
    from _quant_fixtures import gptq_tensors, write_checkpoint

    parts, _ = gptq_tensors(torch.randn(32, 128), 4, 64)
    tensors = {f"model.layers.0.self_attn.q_proj.{k}": v for k, v in parts.items()}
    gptq = write_checkpoint(
        tmp_path / "gptq", tensors, {"quant_method": "gptq", "bits": 4, "group_size": 64}
    )
    assert not _top_modules("inspect", str(gptq)) & HEAVY  # the codecs import torch to decode
    hf = llama_weights(layers=1, hidden=32, heads=2, kv_heads=2, ffn=64, vocab=48)
    gguf = tiny_llama_gguf(tmp_path / "m.gguf", hf, heads=2, kv_heads=2, type_name="Q4_0")
    assert not _top_modules("inspect", str(gguf)) & (HEAVY - {"numpy"})  # gguf needs numpy


def test_a_cold_report_imports_no_scipy(tmp_path: Path) -> None:
    src = write_llama_like(tmp_path / "ckpt", layers=1, hidden=32, intermediate=48, vocab=40)
    argv = ["report", str(src), "--out", str(tmp_path / "r"), "--no-cache", "-q"]
    loaded = _imported_by_command(*argv)
    assert {"torch", "matplotlib"} <= loaded  # it computed and drew
    # scipy.optimize (~0.4 s of CPU) is imported only by the WeightWatcher MP fit (--mp-method ww)
    assert "scipy" not in loaded


def test_inspect_of_a_local_file_draws_and_fits_nothing(minilm_path: Path) -> None:
    loaded = _top_modules("inspect", str(minilm_path / "model.safetensors"))
    assert "rich" in loaded  # the probe sees what the command imported
    assert not loaded & HEAVY


# ------------------------------------------------------------------ threads


def test_thread_count_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPECTRA_NUM_THREADS", raising=False)
    assert C.cli_threads(None) == C.DEFAULT_THREADS == 1
    assert C.cli_threads(3) == 3
    monkeypatch.setenv("SPECTRA_NUM_THREADS", "2")
    assert C.cli_threads(None) is None  # the job reads (and checks) the variable
    assert C.cli_threads(4) == 4


@pytest.mark.parametrize("command", ["report", "compare", "init", "convert", "plan", "mitigate"])
def test_every_computing_command_takes_threads(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "--threads" in result.output


def test_threads_below_one_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", "--out", str(tmp_path / "r"), "--threads", "0"])
    assert result.exit_code == 2
    assert "--threads" in result.output


# ------------------------------------------------------------------ progress lines


def test_progress_lines_are_rate_limited(capsys: pytest.CaptureFixture[str]) -> None:
    now = [0.0]
    log = C.ProgressLog("report", enabled=True, interval=10.0, clock=lambda: now[0])
    for done in range(1, 101):
        now[0] = done * 0.5  # 50 s for 100 units: a line at most every 10 s
        log.update("matrices", done, 100, "x MB read")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 5  # at 10, 20, 30, 40 s, and "done" at 50 s
    assert lines[0] == "spectra report: matrices 20/100 (20%), x MB read, 10 s elapsed, ~38 s left"
    assert lines[-1].startswith("spectra report: matrices 100/100 (100%)")
    assert lines[-1].endswith("done")
    quiet = C.ProgressLog("report", enabled=True, interval=10.0, clock=lambda: 1.0)
    quiet.update("matrices", 5, 5)  # a run shorter than one interval prints nothing
    assert capsys.readouterr().err == ""


def test_report_off_a_terminal_prints_progress_lines(tmp_path: Path) -> None:
    src = write_llama_like(tmp_path / "ckpt", layers=1, hidden=32, intermediate=48, vocab=40)
    env = {**os.environ, "SPECTRA_PROGRESS_INTERVAL": "0"}
    argv = [sys.executable, "-m", "spectra", "report", str(src), "--out", str(tmp_path / "r")]
    argv += ["--no-cache", "--format", "json"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("spectra report:")]
    assert lines, proc.stderr
    assert lines[0].startswith("spectra report: matrices 1/9 ")  # 7 block matrices + 2 vocab
    assert lines[-1].startswith("spectra report: matrices 9/9 (100%)") and "done" in lines[-1]
    quiet = subprocess.run([*argv, "--force", "-q"], capture_output=True, text=True, env=env)
    assert quiet.returncode == 0 and quiet.stderr == ""
