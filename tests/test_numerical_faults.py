"""Numerical faults end to end: NaN/Inf, all-zero, rank-deficient, 1xN and huge-aspect matrices,
and matrices over the engine's memory budget.

The checkpoint is synthetic (tests/_source_fixtures.py) and goes through `spectra report` (the
CLI, in process); every finite matrix's numbers are checked against a float64 SVD of the same
bytes, so "the analysis continues for the rest" is a checked property, not a hope.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _source_fixtures import write_safetensors

from spectra.linalg.decompose import (
    GRAM_BYTES_PER_ENTRY,
    MIN_GRAM_BLOCK,
    SpectrumOptions,
    oversize_plan,
)
from spectra.linalg.engine import EngineOptions, MemoryBudgetWarning, compute_spectra
from spectra.linalg.exact import gram_svdvals

P = "model.layers.{}.{}.weight"
NAMES = {
    "q": P.format(0, "self_attn.q_proj"),
    "k": P.format(0, "self_attn.k_proj"),  # 2 NaN
    "v": P.format(0, "self_attn.v_proj"),  # 1 +Inf, 1 -Inf, 1 NaN
    "o": P.format(0, "self_attn.o_proj"),  # all zeros
    "up": P.format(0, "mlp.up_proj"),  # rank 4 of 64
    "down": P.format(0, "mlp.down_proj"),  # 1 x 50000
    "gate": P.format(0, "mlp.gate_proj"),  # 3 x 40000
    "gate1": P.format(1, "mlp.gate_proj"),  # 40000 x 3
    "q1": P.format(1, "self_attn.q_proj"),  # 96 x 64, a second healthy fit
}


def _faulty_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(9)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    k, v = r(64, 64), r(64, 64)
    k[3, 5] = k[60, 1] = float("nan")
    v[0, 0], v[1, 1], v[2, 2] = float("inf"), float("-inf"), float("nan")
    return {
        NAMES["q"]: r(64, 64),
        NAMES["k"]: k,
        NAMES["v"]: v,
        NAMES["o"]: torch.zeros(64, 64),
        NAMES["up"]: r(64, 4) @ r(4, 64) * 10,
        NAMES["down"]: r(1, 50000),
        NAMES["gate"]: r(3, 40000),
        NAMES["gate1"]: r(40000, 3),
        NAMES["q1"]: r(96, 64),
    }


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`spectra report` on the faulty checkpoint, once with the default budget and once with a
    budget (0.3 MiB, halved by the prefetch to 150 KiB) that the three long matrices exceed."""
    from typer.testing import CliRunner

    from spectra.cli.main import app

    root = tmp_path_factory.mktemp("faults")
    tensors = _faulty_tensors()
    ckpt = write_safetensors(root / "ck" / "model.safetensors", tensors)
    runs = {}
    for label, extra in (("default", []), ("tiny", ["--max-memory", "0.3"])):
        out = root / f"out-{label}"
        args = ["report", str(ckpt.parent), "--out", str(out), "--no-cache", "--device", "cpu"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = CliRunner().invoke(app, [*args, *extra, "-q"])
        assert result.exit_code == 0, result.output
        doc = json.loads((out / "metrics.json").read_text())
        runs[label] = {
            "out": out,
            "layers": {lm["key"]: lm for lm in doc["layers"]},
            "summary": doc["summary"],
            "warnings": [w for w in caught if issubclass(w.category, MemoryBudgetWarning)],
        }
    return {"tensors": tensors, **runs}


def _reference(W: torch.Tensor) -> dict[str, float]:
    """log_norm and stable_rank from a float64 SVD (methods.md section 2)."""
    lam = torch.linalg.svdvals(W.double()).square()
    return {
        "log_norm": math.log10(float(lam.sum())),
        "stable_rank": float(lam.sum() / lam.max()),
        "log_spectral_norm": math.log10(float(lam.max())),
    }


def test_non_finite_matrices_are_reported_per_matrix(faulty: dict[str, Any]) -> None:
    layers = faulty["default"]["layers"]
    for name, counts in ((NAMES["k"], "2 NaN and 0 Inf"), (NAMES["v"], "1 NaN and 2 Inf")):
        lm = layers[name]
        assert lm["fit_status"] == "failed" and "non-finite" in lm["warnings"]
        assert f"{name}: {counts} entries of 4096; not decomposed" == lm["fit_message"]
        assert lm["alpha"] is None and lm["log_norm"] is None and lm["num_evals"] == 0
    standouts = {s["key"] for s in faulty["default"]["summary"]["standouts"]}
    assert {NAMES["k"], NAMES["v"]} <= standouts


def test_report_files_show_the_non_finite_matrices(faulty: dict[str, Any]) -> None:
    out: Path = faulty["default"]["out"]
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for name, counts in ((NAMES["k"], "2 NaN and 0 Inf"), (NAMES["v"], "1 NaN and 2 Inf")):
        assert f"{name}: {counts} entries of 4096" in html
        assert f"{name}: {counts} entries of 4096".replace("_", "\\_") in md
    assert html.count(">non-finite</span>") >= 2
    csv = (out / "metrics.csv").read_text()
    assert sum("non-finite" in line for line in csv.splitlines()) == 2


def test_the_analysis_continues_for_every_finite_matrix(faulty: dict[str, Any]) -> None:
    layers = faulty["default"]["layers"]
    finite = [n for n in NAMES.values() if n not in (NAMES["k"], NAMES["v"], NAMES["o"])]
    for name in finite:
        ref, lm = _reference(faulty["tensors"][name]), layers[name]
        for metric, value in ref.items():
            assert lm[metric] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, metric)
        assert lm["num_evals"] == min(faulty["tensors"][name].shape)
    assert layers[NAMES["q"]]["fit_status"] == "ok" and layers[NAMES["q1"]]["fit_status"] == "ok"


def test_zero_and_rank_deficient_matrices(faulty: dict[str, Any]) -> None:
    zero, low = faulty["default"]["layers"][NAMES["o"]], faulty["default"]["layers"][NAMES["up"]]
    assert zero["numerical_rank"] == 0 and zero["num_evals"] == 64
    assert zero["fit_status"] == "skipped" and zero["alpha"] is None
    assert zero["log_norm"] is None and zero["stable_rank"] is None  # log10(0), 0/0: no number
    assert "rank-deficient" in zero["warnings"]
    assert low["numerical_rank"] == 4 and "rank-deficient" in low["warnings"]
    assert low["fit_status"] == "skipped" and "4 eigenvalues" in low["fit_message"]


def test_one_row_and_huge_aspect_matrices(faulty: dict[str, Any]) -> None:
    layers = faulty["default"]["layers"]
    for key, rank in (("down", 1), ("gate", 3), ("gate1", 3)):
        lm = layers[NAMES[key]]
        assert lm["numerical_rank"] == rank and lm["num_evals"] == rank
        assert lm["fit_status"] == "skipped" and "fewer than min_evals=8" in lm["fit_message"]
        assert lm["warnings"] == []  # a short spectrum is not a defect of the matrix


def test_over_budget_report_warns_once_and_matches(faulty: dict[str, Any]) -> None:
    tiny, full = faulty["tiny"], faulty["default"]
    assert len(full["warnings"]) == 0
    assert len(tiny["warnings"]) == 1
    msg = str(tiny["warnings"][0].message)
    # the budget the user gave (--max-memory 0.3), then its per-batch half (issue 14: only the
    # half was quoted, so `--max-memory 16` read as an 8 MiB budget)
    assert msg.startswith(
        "3 of 9 matrices need more working memory than the budget of 307.2 KiB on cpu, "
        "153.6 KiB for each of the two batches alive at once"
    )
    assert "3 x 40000" in msg or "40000 x 3" in msg
    assert "float64 Gram matrix summed over slices" in msg
    for name, lm in full["layers"].items():
        other = tiny["layers"][name]
        assert other["fit_status"] == lm["fit_status"] and other["warnings"] == lm["warnings"]
        for metric in ("alpha", "log_norm", "stable_rank", "numerical_rank", "entropy"):
            a, b = lm[metric], other[metric]
            assert (a is None and b is None) or b == pytest.approx(a, rel=1e-9), (name, metric)


# -- engine level: budget planning and the chunked Gram route ----------------------------------
@pytest.mark.parametrize("shape", [(50, 7), (7, 50), (1, 300), (300, 1), (33, 33)])
def test_chunked_gram_equals_float64_svd(shape: tuple[int, int]) -> None:
    W = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = torch.linalg.svdvals(W)
    for block in (1, 5, 64, 1000):
        S = gram_svdvals(W.float(), block=block)
        assert S.dtype == torch.float64
        assert torch.allclose(S, torch.linalg.svdvals(W.float().double()), rtol=1e-9, atol=1e-12)
    assert torch.allclose(gram_svdvals(W, block=3), ref, rtol=1e-9, atol=1e-12)


def test_oversize_plan_decisions() -> None:
    values, topk = SpectrumOptions(mode="values"), SpectrumOptions(mode="topk", k=4)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert oversize_plan(values, (64, 64), 1 << 30, cpu) is None
    plan = oversize_plan(values, (4096, 256), 4 << 20, gpu)  # Gram 1.5 MiB fits, W does not
    assert plan is not None and plan.device == gpu
    assert plan.gram_block == ((4 << 20) - GRAM_BYTES_PER_ENTRY * 256 * 256) // (8 * 256)
    assert plan.need == values.bytes_per_matrix((4096, 256), gpu) > 4 << 20
    plan = oversize_plan(values, (4096, 4096), 1 << 20, gpu)  # not even the Gram matrix fits
    assert plan is not None and plan.device == cpu and plan.gram_block == MIN_GRAM_BLOCK
    plan = oversize_plan(topk, (4096, 4096), 1 << 20, gpu)
    assert plan is not None and plan.device == cpu and plan.gram_block is None
    plan = oversize_plan(topk, (4096, 4096), 1 << 20, cpu)
    assert plan is not None and plan.device == cpu and plan.gram_block is None
    svdvals = SpectrumOptions(mode="values", route="svdvals")
    assert oversize_plan(svdvals, (4096, 4096), 1 << 20, cpu).gram_block is None  # type: ignore[union-attr]


class _Fake:
    """A minimal CheckpointLike over in-memory tensors (MatrixRef-like records)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        from types import SimpleNamespace

        self.tensors = tensors
        self.refs = [
            SimpleNamespace(key=k, shape=tuple(t.shape), role="other", layer=None, nbytes=0)
            for k, t in tensors.items()
        ]

    def matrices(self) -> list[Any]:
        return self.refs

    def read_many(self, refs: Any, *, dtype: torch.dtype, device: str) -> Any:
        for ref in refs:
            yield ref, self.tensors[ref.key].to(dtype)

    def content_key(self, ref: Any) -> str:
        return ref.key


@pytest.mark.parametrize("mode", ["values", "topk"])
def test_engine_over_budget_matches_and_warns_once(mode: str) -> None:
    g = torch.Generator().manual_seed(3)
    tensors = {
        "a": torch.randn(2000, 48, generator=g),
        "b": torch.randn(48, 2000, generator=g),
        "c": torch.randn(2000, 48, generator=g),
        "small": torch.randn(8, 8, generator=g),
    }
    tensors["b"][0, 0] = float("nan")
    ck = _Fake(tensors)
    topk = {"k": 4, "method": "exact"} if mode == "topk" else {}
    opts = SpectrumOptions(mode=mode, **topk)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = list(compute_spectra(ck, None, opts, engine=EngineOptions("cpu", prefetch=False)))
        tight = EngineOptions("cpu", max_memory=64 << 10, prefetch=False)
        tiny = list(compute_spectra(ck, None, opts, engine=tight))
    budget = [w for w in caught if issubclass(w.category, MemoryBudgetWarning)]
    assert len(budget) == 1, [str(w.message) for w in caught]
    assert str(budget[0].message).startswith("3 of 4 matrices need more working memory")
    for a, b in zip(ref, tiny, strict=True):
        assert a.key == b.key and a.status == b.status and a.message == b.message
        assert torch.allclose(a.values, b.values, rtol=1e-9, atol=1e-12)
        W = tensors[a.key].double()
        if a.ok:
            exact = torch.linalg.svdvals(W)[: a.k]
            assert np.allclose(b.values.numpy(), exact.numpy(), rtol=1e-5, atol=1e-6)
    assert not tiny[1].ok and "1 NaN and 0 Inf entries of 96000" in tiny[1].message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_finite_scan_finds_every_nan_and_inf_across_blocks(dtype: torch.dtype) -> None:
    from spectra.linalg.decompose import finite_matrices

    W = torch.randn(5, 37, 11, generator=torch.Generator().manual_seed(0)).to(dtype)
    W[1, 36, 10] = float("nan")  # last entry of the last block
    W[2, 0, 0] = float("inf")
    W[3, 20, 5] = float("-inf")
    W[4, 7, 3] = torch.finfo(dtype).max  # huge but finite
    want = torch.isfinite(W).flatten(1).all(dim=1)
    assert want.tolist() == [True, False, False, False, True]
    for block in (1, 11 * 5, 11 * 5 * 4, 1 << 24):  # one row, one row of the batch, ..., whole
        assert torch.equal(finite_matrices(W, block_elements=block), want)
