"""A bfloat16 source's residual base (issue 14, case 14): warned about with the measured error
by default (outputs unchanged), stored as float32 on request with a float32-level error."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from _adapt_fixtures import one_thread  # noqa: F401
from _source_fixtures import write_llama_like
from safetensors.torch import load_file
from typer.testing import CliRunner

from spectra.cli.main import app
from spectra.errors import ValidationError
from spectra.export.residual import ResidualPrecisionWarning
from spectra.formats.peft import read_peft_adapter
from spectra.jobs.init import InitOptions, init_adapter

TARGETS = "q,v"


def _model(tmp_path: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    return write_llama_like(
        tmp_path / "m", layers=2, hidden=64, intermediate=128, vocab=50, dtype=dtype
    )


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _max_rebuild_error(source: Path, res_dir: Path, adapter_dir: Path) -> float:
    """max over targets of ||W - (W_res + s B A)|| / ||W||, from the files written."""
    W, R = _tensors(source), _tensors(res_dir)
    adapter = read_peft_adapter(adapter_dir)
    worst = 0.0
    for module, (A, B) in adapter.factors.items():
        key = f"{module}.weight"
        w = W[key].to(torch.float64)
        rebuilt = R[key].to(torch.float64) + adapter.scale(module) * (
            B.to(torch.float64) @ A.to(torch.float64)
        )
        worst = max(
            worst, float(torch.linalg.matrix_norm(w - rebuilt) / torch.linalg.matrix_norm(w))
        )
    return worst


def test_bf16_residual_is_warned_with_its_error_and_float32_fixes_it(tmp_path: Path) -> None:
    model = _model(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        half = init_adapter(model, InitOptions(out=tmp_path / "half", rank=4, targets=TARGETS))
    msgs = [str(w.message) for w in caught if issubclass(w.category, ResidualPrecisionWarning)]
    assert len(msgs) == 1 and "\n" not in msgs[0], msgs
    assert "bfloat16" in msgs[0] and f"{half.max_error:.1e}" in msgs[0]
    assert "--residual-dtype float32" in msgs[0]
    assert half.max_error > 1e-4  # bfloat16 rounding of the residual
    assert half.residual_dir is not None
    assert all(t.dtype == torch.bfloat16 for t in _tensors(half.residual_dir).values())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = init_adapter(
            model,
            InitOptions(out=tmp_path / "f32", rank=4, targets=TARGETS, residual_dtype="float32"),
        )
    assert not [w for w in caught if issubclass(w.category, ResidualPrecisionWarning)]
    assert full.max_error < 1e-6, full.max_error  # float32 level
    assert full.residual_dir is not None
    assert _max_rebuild_error(model, full.residual_dir, full.adapter_dir) < 1e-6
    src, res = _tensors(model), _tensors(full.residual_dir)
    assert set(res) == set(src) and all(t.dtype == torch.float32 for t in res.values())
    replaced = {f"{m}.weight" for m in read_peft_adapter(full.adapter_dir).factors}
    for name, t in src.items():  # untouched tensors: the source's values, exactly
        if name not in replaced:
            assert torch.equal(res[name], t.to(torch.float32)), name
    config = json.loads((full.residual_dir / "config.json").read_text())
    assert config.get("torch_dtype", "float32") == "float32"
    index = json.loads((full.residual_dir / "model.safetensors.index.json").read_text())
    if "total_size" in index.get("metadata", {}):
        assert index["metadata"]["total_size"] == sum(4 * t.numel() for t in res.values())
    manifest = json.loads((full.out / "spectra.json").read_text())
    assert manifest["options"]["residual_dtype"] == "float32"


def test_float32_source_is_not_warned(tmp_path: Path) -> None:
    model = _model(tmp_path, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = init_adapter(model, InitOptions(out=tmp_path / "o", rank=4, targets=TARGETS))
    assert not [w for w in caught if issubclass(w.category, ResidualPrecisionWarning)]
    assert res.max_error < 1e-6


def test_residual_dtype_cli_option(tmp_path: Path) -> None:
    model = _model(tmp_path)
    runner = CliRunner()
    base = ["init", str(model), "--rank", "4", "--targets", TARGETS, "--device", "cpu"]
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1 and "bfloat16" in lines[0] and "--residual-dtype float32" in lines[0]
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--residual-dtype", "float32"])
    assert res.exit_code == 0, res.output
    assert "warning:" not in res.output
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "c"), "--residual-dtype", "f8"])
    assert res.exit_code == 2 and "residual dtype 'f8'" in res.output, res.output
    with pytest.raises(ValidationError, match="residual dtype"):
        InitOptions(out=tmp_path / "d", residual_dtype="bf16")
