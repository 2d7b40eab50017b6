"""`spectra remove-traps`: WeightWatcher 0.8's remove_traps written as a checkpoint.

Planted answers: large weights planted in a noise matrix are the traps; after removal the
shuffled ESD has no spike past the MP bulk, the change is exactly the definition's
`sum (R - T)`, and matrices without a trap are copied byte for byte. On the bundled MiniLM the one
trap `spectra report --traps` finds goes away.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _source_fixtures import write_sharded
from safetensors.torch import load_file
from typer.testing import CliRunner

from spectra.analysis.mp import mp_fit
from spectra.analysis.traps import find_traps, trap_modes
from spectra.cli.main import app
from spectra.errors import ValidationError
from spectra.jobs.remove_traps import REPORT_NAME, RemoveTrapsOptions, remove_traps

TRAPPED = "model.layers.0.mlp.up_proj.weight"
CLEAN = "model.layers.0.mlp.down_proj.weight"
PLANTED = {(17, 42): 2.0, (150, 7): -1.5}


def _checkpoint(folder: Path, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    W = torch.randn(200, 300, generator=g, dtype=torch.float64) * 0.02
    for (r, c), value in PLANTED.items():
        W[r, c] = value
    tensors = {
        "model.layers.0.input_layernorm.weight": torch.linspace(0.5, 1.5, 300).to(dtype),
        TRAPPED: W.to(dtype),
        CLEAN: (torch.randn(300, 200, generator=g, dtype=torch.float64) * 0.02).to(dtype),
    }
    write_sharded(folder, tensors, shards=2, config={"model_type": "llama"})
    return tensors


def _expected(W: torch.Tensor, which: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """The definition (methods.md section 2f), step by step: each chosen trap mode T of the
    shuffled matrix, mapped back, swapped for R = mean(T) + std(T) G (G: default_rng(seed + 1)
    draws standardized to mean 0, std 1)."""
    modes = trap_modes(W, mp_fit, seed=seed)
    assert modes is not None
    rng = np.random.default_rng(seed + 1)
    new = W.numpy().copy()
    for i in which:
        T = modes.component(int(modes.spikes[i - 1]))
        G = rng.standard_normal(T.shape)
        G = (G - G.mean()) / (G - G.mean()).std()
        new += T.mean() + T.std() * G - T
    return new


def test_planted_traps_are_removed_and_nothing_else_changes(tmp_path: Path) -> None:
    tensors = _checkpoint(tmp_path / "src")
    W = tensors[TRAPPED]
    count, found = find_traps(W, mp_fit)
    assert count == 2 and {(t.row, t.col) for t in found} == set(PLANTED)
    result = remove_traps(tmp_path / "src", tmp_path / "out", RemoveTrapsOptions())
    rows = {m.key: m for m in result.matrices}
    assert rows[TRAPPED].found == 2 and rows[TRAPPED].removed == (1, 2)
    assert {(r, c): w for r, c, w in rows[TRAPPED].positions} == PLANTED
    assert rows[CLEAN].found == 0 and rows[CLEAN].removed == () and result.removed == 2
    new = {}
    for shard in sorted((tmp_path / "out").glob("*.safetensors")):
        new.update(load_file(str(shard)))
    Wn = new[TRAPPED]
    # no spike left past the MP bulk of the shuffled ESD, and the planted weights are gone
    assert find_traps(Wn, mp_fit)[0] == 0
    assert all(abs(float(Wn[r, c])) < 0.1 for r, c in PLANTED)
    # the change is exactly the definition's sum (R - T): the trap's weight goes, and the rest
    # of the matrix moves by the mode's leakage plus noise of std(T) (methods.md section 2f)
    np.testing.assert_allclose(Wn.numpy(), _expected(W, (1, 2)), rtol=0, atol=1e-14)
    change = np.linalg.norm((Wn - W).numpy()) / np.linalg.norm(W.numpy())
    assert rows[TRAPPED].change == pytest.approx(change, rel=1e-12)
    for key in (CLEAN, "model.layers.0.input_layernorm.weight"):
        assert torch.equal(new[key], tensors[key])  # no trap / not a matrix: byte for byte
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["traps_removed"] == 2 and report["options"]["traps"] == "all"


def test_one_chosen_trap_leaves_the_other(tmp_path: Path) -> None:
    tensors = _checkpoint(tmp_path / "src", dtype=torch.float32)
    opts = RemoveTrapsOptions(traps=(2, 5))  # 5: past the count, ignored
    result = remove_traps(tmp_path / "src", tmp_path / "out", opts)
    row = next(m for m in result.matrices if m.key == TRAPPED)
    assert row.removed == (2,) and row.positions[0][:2] == (150, 7)
    new = {}
    for shard in sorted((tmp_path / "out").glob("*.safetensors")):
        new.update(load_file(str(shard)))
    assert new[TRAPPED].dtype == torch.float32
    count, found = find_traps(new[TRAPPED], mp_fit)
    assert count == 1 and (found[0].row, found[0].col) == (17, 42)
    W64 = tensors[TRAPPED].double()
    np.testing.assert_allclose(new[TRAPPED].numpy(), _expected(W64, (2,)), rtol=0, atol=1e-6)


def test_minilm_trap_is_removed(minilm_path: Path, tmp_path: Path) -> None:
    key = "encoder.layer.0.output.dense.weight"  # its one trap: row 99, col 856 (7.91)
    result = remove_traps(minilm_path, tmp_path / "out", RemoveTrapsOptions(include=(key,)))
    (row,) = result.matrices
    assert row.found == 1 and row.removed == (1,)
    assert row.positions[0][:2] == (99, 856) and row.positions[0][2] == pytest.approx(
        7.91, abs=5e-3
    )
    new = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert find_traps(new[key], mp_fit)[0] == 0
    src = load_file(str(minilm_path / "model.safetensors"))
    assert all(torch.equal(new[k], src[k]) for k in src if k != key)


runner = CliRunner()


def test_cli_removes_and_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "src", dtype=torch.float32)
    ok = runner.invoke(app, ["remove-traps", str(tmp_path / "src"), "--out", str(tmp_path / "o")])
    assert ok.exit_code == 0, ok.output
    assert "removed 2 traps from 1 of 2 matrices" in ok.output
    bad = {
        ("--trap", "0"): "trap indices are 1-based",
        ("--mp-method", "kde"): "mp_method must be one of quantile, ww",
        ("--roles", "q"): "no matrix of",
        ("--seed", "-3"): "seed must be a non-negative integer",
    }
    for args, message in bad.items():
        res = runner.invoke(
            app, ["remove-traps", str(tmp_path / "src"), "--out", str(tmp_path / "o2"), *args]
        )
        assert res.exit_code == 2 and message in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
        assert not (tmp_path / "o2").exists()
    helped = runner.invoke(app, ["remove-traps", "--help"])
    assert "remove_traps" in helped.output and "--trap" in helped.output


def test_options_refuse_bad_values() -> None:
    with pytest.raises(ValidationError, match="min_evals must be a positive integer"):
        RemoveTrapsOptions(min_evals=0)
