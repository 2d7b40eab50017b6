"""`report ADAPTER_DIR` is refused in one line (issue 14, case 12): it used to fit power laws to
lora_A and lora_B separately (r eigenvalues each, mostly warned), which says nothing about the
fine-tune. The update's own spectrum (rank r) is not a heavy-tailed ESD either; `compare BASE
ADAPTER` is the analysis of an adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
from _source_fixtures import write_lora_adapter
from typer.testing import CliRunner

from spectra.cli.main import app
from spectra.errors import ValidationError
from spectra.jobs.report import AnalyzeOptions, analyze

SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (16, 12),
    "model.layers.0.mlp.up.weight": (8, 12),
}


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    return write_lora_adapter(tmp_path / "adapter", SHAPES, r=4)


def test_adapter_folder_and_file_are_refused(adapter: Path) -> None:
    for source in (adapter, adapter / "adapter_model.safetensors"):
        with pytest.raises(ValidationError, match=r"LoRA factors .*spectra compare BASE ADAPTER"):
            analyze(source, AnalyzeOptions(device="cpu"), cache=False)


def test_cli_exit_2(adapter: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["report", str(adapter), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert "spectra compare BASE ADAPTER" in res.output
    assert not (tmp_path / "o").exists()
