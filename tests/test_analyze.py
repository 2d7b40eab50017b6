"""`analyze()` end to end on tiny synthetic checkpoints: selection, optional metrics, cache, NaN."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _source_fixtures import llama_tensors, write_llama_like, write_safetensors

from spectra.analysis.htsr import MatrixMeta, layer_metrics
from spectra.analysis.outliers import outlier_ratio
from spectra.analysis.randomized import randomized_control
from spectra.analysis.results import Analysis
from spectra.errors import ValidationError
from spectra.jobs.report import AnalyzeOptions, analyze
from spectra.linalg.cache import SpectrumCache
from spectra.linalg.exact import exact_svdvals
from spectra.sources.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama_like(tmp_path_factory.mktemp("llama") / "ckpt", hidden=48, intermediate=96)


def test_every_matrix_matches_float64_reference(llama_dir: Path) -> None:
    an = analyze(llama_dir, AnalyzeOptions(device="cpu"), cache=None)
    with Checkpoint.open(str(llama_dir)) as ck:
        refs = ck.matrices()
        assert [lm.key for lm in an.layers] == [r.key for r in refs]
        for ref, W in ck.read_many(refs):
            S = np.linalg.svd(W.double().numpy(), compute_uv=False)
            want = layer_metrics(S, ref.shape, MatrixMeta(ref.key))
            got = an.layer(ref.key)
            assert got.role == ref.role and got.layer == ref.layer and got.dtype == "BF16"
            assert got.alpha == pytest.approx(want.alpha, rel=1e-9)
            assert got.xmin == pytest.approx(want.xmin, rel=1e-9)
            assert got.stable_rank == pytest.approx(want.stable_rank, rel=1e-9)
            assert got.outlier_ratio == outlier_ratio(W)
            assert got.mp_bulk_max is None and got.rand_distance is None
            np.testing.assert_allclose(an.esds[ref.key], np.sort(S**2)[::-1], rtol=1e-9)
    assert an.summary.num_matrices == len(refs)
    assert set(an.summary.by_role) == {
        "q",
        "k",
        "v",
        "o",
        "gate",
        "up",
        "down",
        "embedding",
        "lm_head",
    }
    assert an.options["outliers"] is True and an.versions["torch"] == torch.__version__


def test_selection_and_optional_metrics(llama_dir: Path) -> None:
    an = analyze(
        llama_dir,
        AnalyzeOptions(
            roles=("q", "down"),
            exclude=("*layers.1.*",),
            mp_fit=True,
            randomize=True,
            outliers=False,
            device="cpu",
        ),
        cache=None,
    )
    assert sorted(lm.key for lm in an.layers) == [
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
    ]
    for lm in an.layers:
        assert lm.outlier_ratio is None
        assert lm.mp_bulk_max is not None and lm.mp_bulk_max > 0
        assert lm.mp_num_spikes is not None
        assert lm.rand_distance is not None and 0 <= lm.rand_distance < math.sqrt(math.log(2))
    again = analyze(
        llama_dir,
        AnalyzeOptions(roles=("q",), randomize=True, exclude=("*layers.1.*",), device="cpu"),
        cache=None,
    )
    q = "model.layers.0.self_attn.q_proj.weight"
    assert again.layer(q).rand_distance == an.layer(q).rand_distance  # seeded
    # the engine's batched shuffled spectra equal the pure per-matrix control
    with Checkpoint.open(str(llama_dir)) as ck:
        W = ck.read(q)
    _, want = randomized_control(W, an.esds[q], lambda X: exact_svdvals(X).numpy(), seed=0)
    assert an.layer(q).rand_distance == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValidationError, match="no weight matrices .* include=\\['nothing\\*'\\]"):
        analyze(llama_dir, AnalyzeOptions(include=("nothing*",)), cache=None)


def test_cached_run_still_has_outliers(llama_dir: Path, tmp_path: Path) -> None:
    cache = SpectrumCache(tmp_path / "cache")
    cold = analyze(llama_dir, AnalyzeOptions(device="cpu", roles=("up",)), cache=cache)
    warm = analyze(llama_dir, AnalyzeOptions(device="cpu", roles=("up",)), cache=cache)
    assert [lm.to_dict() for lm in warm.layers] == [lm.to_dict() for lm in cold.layers]
    assert all(lm.outlier_ratio is not None for lm in warm.layers)


def test_non_finite_matrix_is_reported_not_fatal(tmp_path: Path) -> None:
    t = llama_tensors(layers=1, hidden=32, intermediate=64, vocab=40, dtype=torch.float32)
    t["model.layers.0.self_attn.k_proj.weight"][3, 4] = float("nan")
    path = write_safetensors(tmp_path / "model.safetensors", t)
    an = analyze(path, AnalyzeOptions(device="cpu"), cache=None)
    bad = an.layer("model.layers.0.self_attn.k_proj.weight")
    assert bad.fit_status == "failed" and "non-finite" in bad.warnings
    assert bad.alpha is None and bad.outlier_ratio is None
    assert an.layer("model.layers.0.self_attn.q_proj.weight").fit_status == "ok"
    assert any(s["key"] == bad.key for s in an.summary.standouts)
    text = an.to_json()
    assert json.loads(text)["layers"][0]["key"] == an.layers[0].key
    back = Analysis.from_json(text)
    assert back.layers == an.layers


def test_options_validation() -> None:
    assert AnalyzeOptions(roles="q").roles == ("q",)
    with pytest.raises(ValidationError, match="outlier_multiplier must be > 0, got 0"):
        AnalyzeOptions(outlier_multiplier=0)


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("=1+2", "'=1+2"),
        ("+x", "'+x"),
        ("-x", "'-x"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("  =x", "'  =x"),
        ("\t=x", "'=x"),  # the tab is dropped, the formula still prefixed
        ("a\x1b[1;31mb\x1b[0mc", "abc"),
        ("t\x1b]0;title\x07x", "tx"),  # OSC string removed with its payload
        ("n\x9b2Jm\x85e\x00", "nme"),  # 8-bit CSI, C1 NEL, NUL
        ("model.layers.0.q_proj.weight", "model.layers.0.q_proj.weight"),
        # a `;` splits cells in comma-decimal locales (issue 14: `x;=1+2` was left as it was)
        ("x;=1+2", "x;'=1+2"),
        ("a; @SUM(A1);+b", "a; '@SUM(A1);'+b"),
        ("=a;-b", "'=a;'-b"),
        ("a;b;c", "a;b;c"),
    ],
)
def test_csv_cells_are_inert(raw: str, want: str) -> None:
    from spectra.analysis.csvsafe import inert_cell

    assert inert_cell(raw) == want
    assert inert_cell(-1.5) == -1.5 and inert_cell(-3) == -3 and inert_cell(None) == ""


def test_analysis_csv_keeps_negative_numbers_and_neutralises_names(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    name = "-\x1b[31mq_proj.weight"
    path = write_safetensors(
        tmp_path / "model.safetensors", {name: torch.randn(24, 24, generator=g)}
    )
    an = analyze(path, AnalyzeOptions(device="cpu", outliers=False), cache=None)
    text = an.to_csv()
    line = text.splitlines()[1]
    assert line.startswith("'-q_proj.weight,'-q_proj.weight,") and "\x1b" not in text
    assert f",{an.layers[0].log_spectral_norm!r}," in line  # numbers written as numbers


# -- the outlier ratio rides on the spectrum pass's reads -----------------------------------------
def _counting(ck: Checkpoint) -> list[str]:
    """Record every matrix `ck.read_many` yields (the engine's reads and any other pass)."""
    reads: list[str] = []
    inner = ck.read_many

    def read_many(refs, **kw):  # noqa: ANN001, ANN202
        for ref, W in inner(refs, **kw):
            reads.append(ref.key)
            yield ref, W

    ck.read_many = read_many  # type: ignore[method-assign]
    return reads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_outlier_ratio_in_one_read_is_bit_identical_to_a_separate_pass(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    """One read per matrix; outlier ratios equal the former second pass (matrices read as
    stored) exactly, and every other metric equals a run without outliers exactly."""
    t = llama_tensors(layers=1, hidden=40, intermediate=72, vocab=60, dtype=dtype, seed=2)
    t["model.layers.0.mlp.up_proj.weight"][::7, ::5] *= 40  # planted outliers
    path = write_safetensors(tmp_path / "model.safetensors", t)
    with Checkpoint.open(str(path)) as ck:
        reads = _counting(ck)
        an = analyze(ck, AnalyzeOptions(device="cpu"), cache=None)
        assert sorted(reads) == sorted(r.key for r in ck.matrices())  # each matrix read once
        separate = {ref.key: outlier_ratio(W) for ref, W in ck.read_many(ck.matrices(), dtype=None)}
    plain = analyze(path, AnalyzeOptions(device="cpu", outliers=False), cache=None)
    assert {lm.key: lm.outlier_ratio for lm in an.layers} == separate
    assert an.layer("model.layers.0.mlp.up_proj.weight").outlier_ratio > 0.01
    for a, b in zip(an.layers, plain.layers, strict=True):
        assert {**a.to_dict(), "outlier_ratio": None} == b.to_dict()


def test_cached_run_reads_no_weights_and_a_new_multiplier_reads_once(
    llama_dir: Path, tmp_path: Path
) -> None:
    cache = SpectrumCache(tmp_path / "cache")
    cold = analyze(llama_dir, AnalyzeOptions(device="cpu"), cache=cache)
    with Checkpoint.open(str(llama_dir)) as ck:
        reads = _counting(ck)
        warm = analyze(ck, AnalyzeOptions(device="cpu"), cache=cache)
        assert reads == []  # spectra and outlier ratios both from the cache
        assert [lm.to_dict() for lm in warm.layers] == [lm.to_dict() for lm in cold.layers]
        five = analyze(ck, AnalyzeOptions(device="cpu", outlier_multiplier=5.0), cache=cache)
        assert sorted(reads) == sorted(r.key for r in ck.matrices())  # once each, no SVD
        five_again = analyze(ck, AnalyzeOptions(device="cpu", outlier_multiplier=5.0), cache=cache)
        assert len(reads) == len(ck.matrices())
        by_key = {r.key: W for r, W in ck.read_many(ck.matrices())}
    for lm, again in zip(five.layers, five_again.layers, strict=True):
        assert (
            lm.outlier_ratio == again.outlier_ratio == outlier_ratio(by_key[lm.key], multiplier=5.0)
        )
        assert lm.alpha == cold.layer(lm.key).alpha
