"""`spectra init` and `spectra convert` through the CLI: outputs, one-line errors, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from spectra.cli.main import app

Q0 = "encoder.layer.0.attention.self.query"


def _run(*args: str):  # noqa: ANN202
    return CliRunner().invoke(app, list(args))


def test_init_writes_adapter_residual_and_manifest(minilm_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = _run(
        "init",
        str(minilm_path),
        "--method",
        "milora",
        "--rank",
        "4",
        "--targets",
        f"{Q0},re:layer\\.3\\.output\\.dense$",
        "--out",
        str(out),
        "--dtype",
        "bfloat16",
        "--alpha",
        "8",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    assert "milora: 2 modules, ranks 4-4" in r.output
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted([Q0, "encoder.layer.3.output.dense"])
    assert cfg["lora_alpha"] == 8 and cfg["init_lora_weights"] is True
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as fh:
        a = fh.get_tensor(f"base_model.model.{Q0}.lora_A.weight")
    assert a.dtype == torch.bfloat16 and a.shape == (4, 384)
    manifest = json.loads((out / "spectra.json").read_text())
    assert manifest["options"]["alpha"] == 8.0 and manifest["method"] == "milora"
    assert all(v["error"] < 1e-6 for v in manifest["matrices"].values())
    assert (out / "residual_base" / "config.json").is_file()
    assert (out / "residual_base" / "tokenizer.json").is_file()
    # A second run refuses to overwrite, --force replaces.
    again = _run("init", str(minilm_path), "--rank", "2", "--targets", Q0, "--out", str(out))
    assert again.exit_code == 2 and "--force" in again.output
    forced = _run(
        "init",
        str(minilm_path),
        "--rank",
        "2",
        "--targets",
        Q0,
        "--out",
        str(out),
        "--force",
        "--method",
        "olora",
    )
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "spectra.json").read_text())["method"] == "olora"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--targets", "gate"], "no weight matrix matched targets gate: roles here are"),
        (["--targets", Q0, "--rank", "999"], "exceeds min(m, n) = 384"),
        (["--targets", Q0, "--method", "lorax"], "unknown method 'lorax'"),
        (["--targets", Q0, "--allocate", "energy", "--budget", "5000"], "exceeds the maximum 384"),
        (["--targets", Q0, "--budget", "5"], "--budget needs --allocate"),
        (["--targets", "re:(", "--rank", "2"], "bad target regex"),
        (["--targets", Q0, "--dtype", "int8"], "adapter dtype 'int8'"),
    ],
)
def test_one_line_errors(minilm_path: Path, tmp_path: Path, args: list[str], message: str) -> None:
    r = _run("init", str(minilm_path), "--out", str(tmp_path / "x"), *args)
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert message in text
    assert "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


def test_convert_cli(minilm_path: Path, tmp_path: Path) -> None:
    init = tmp_path / "init"
    assert (
        _run("init", str(minilm_path), "--rank", "2", "--targets", Q0, "--out", str(init)).exit_code
        == 0
    )
    r = _run(
        "convert",
        "--init",
        str(init),
        "--trained",
        str(init / "adapter"),
        "--out",
        str(tmp_path / "lora"),
    )
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {Q0: 4} and cfg["alpha_pattern"] == {Q0: 4}
    bad = _run(
        "convert",
        "--init",
        str(tmp_path / "nope"),
        "--trained",
        str(init),
        "--out",
        str(tmp_path / "l2"),
    )
    assert bad.exit_code == 2 and "does not exist" in bad.output
