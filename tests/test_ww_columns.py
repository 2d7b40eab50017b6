"""WeightWatcher 0.7.7's extra columns, get_summary() means and size filters, compared with
WeightWatcher run in the test on the bundled MiniLM (methods.md section 2, "WeightWatcher
columns"). One WeightWatcher run per option set (session fixtures), on four layers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _ww_fixtures import WW_LAYERS, ww_rows

from spectra.analysis.htsr import MatrixMeta, layer_metrics
from spectra.errors import ValidationError
from spectra.jobs.report import AnalyzeOptions, analyze, select_matrices, size_filter
from spectra.sources.checkpoint import Checkpoint

REL = 1e-4

# WeightWatcher column -> ours (same definition; see methods.md for the mapping)
SAME = {
    "rank_loss": "rank_loss",
    "weak_rank_loss": "weak_rank_loss",
    "sv_max": "sv_max",
    "sv_min": "sv_min",
    "matrix_rank": "numerical_rank",
    "num_spikes": "mp_num_spikes",
    "bulk_max": "mp_bulk_max",
    "sigma_mp": "sigma_mp",
    "mp_softrank": "mp_softrank",
    "rand_num_spikes": "rand_num_spikes",
    "ww_softrank": "ww_softrank",
    "rand_distance": "rand_distance",
    "alpha": "alpha",
}


@pytest.fixture(scope="session")
def ww_mp_random(minilm_path: Path) -> dict[str, dict]:
    # the size filters' layer set comes from the same WeightWatcher process (describe: no SVD)
    filtered = 'list(watcher.describe(min_evals=3, max_evals=1000, max_N=1000)["name"])'
    return ww_rows(minilm_path, "mp_fit=True, randomize=True", extra=filtered)


@pytest.fixture(scope="session")
def ours_mp_random(minilm_path: Path):
    options = AnalyzeOptions(
        include=tuple(WW_LAYERS.values()),
        device="cpu",
        mp_fit=True,
        randomize=True,
        mp_method="ww",
    )
    return analyze(minilm_path, options, cache=None)


def test_columns_equal_weightwatcher(ww_mp_random, ours_mp_random) -> None:
    assert {lm.key for lm in ours_mp_random.layers} == set(WW_LAYERS.values())
    for lm in ours_mp_random.layers:
        row = ww_mp_random[lm.key]
        for theirs, mine in SAME.items():
            got, want = getattr(lm, mine), row[theirs]
            assert got is not None, (lm.key, mine)
            assert got == pytest.approx(want, rel=REL, abs=1e-12), (lm.key, theirs, got, want)
    # the comparison has teeth: the MP fit finds spikes and the Q = 1 layer is in the set
    assert all(ww_mp_random[k]["num_spikes"] > 0 for k in WW_LAYERS.values())


def test_summary_means_equal_get_summary(ww_mp_random, ours_mp_random) -> None:
    theirs = ww_mp_random["__summary__"]
    mine = ours_mp_random.summary.means
    assert set(theirs) == set(mine), (theirs, mine)
    for metric, want in theirs.items():
        assert mine[metric] == pytest.approx(want, rel=REL), metric


def test_quantile_mp_fit_is_documented_alternative(ours_mp_random, minilm_path: Path) -> None:
    """The default (quantile) MP fit fills the same columns with its own sigma; the
    randomized columns do not depend on the MP method but rand_num_spikes does."""
    options = AnalyzeOptions(include=tuple(WW_LAYERS.values()), device="cpu", mp_fit=True)
    quant = analyze(minilm_path, options, cache=None)
    for lm in quant.layers:
        ww_lm = ours_mp_random.layer(lm.key)
        assert lm.sigma_mp is not None and lm.sigma_mp != ww_lm.sigma_mp
        assert lm.mp_softrank == pytest.approx(lm.mp_bulk_max / lm.sv_max**2, rel=1e-12)
        assert lm.rand_num_spikes is None and lm.ww_softrank is None


def test_size_filters_equal_weightwatcher(ww_mp_random, minilm_path: Path) -> None:
    theirs = [name + ".weight" for name in ww_mp_random["__extra__"]]
    options = AnalyzeOptions(min_evals=3, max_evals=1000, max_n=1000)
    with Checkpoint.open(str(minilm_path)) as ck:
        everything = select_matrices(ck, AnalyzeOptions())
        kept, skipped = size_filter(everything, options)
    assert [ref.key for ref in kept] == theirs
    # ours lists each matrix WeightWatcher drops without a word, with the reason
    assert {sk.key for sk in skipped} == {ref.key for ref in everything} - set(theirs)
    reasons = {sk.key: sk.reason for sk in skipped}
    assert reasons["embeddings.token_type_embeddings.weight"] == "min(m, n) = 2 < min_evals = 3"
    assert reasons["embeddings.word_embeddings.weight"] == "max(m, n) = 30522 > max_n = 1000"


def test_skipped_matrices_are_in_the_analysis(minilm_path: Path) -> None:
    options = AnalyzeOptions(roles=("q",), max_n=100, include=("*",))
    with pytest.raises(ValidationError, match="max_n=100 leave none of the 6"):
        analyze(minilm_path, options, cache=None)
    options = AnalyzeOptions(include=("embeddings.*",), min_evals=8, device="cpu")
    an = analyze(minilm_path, options, cache=None)
    assert [sk.key for sk in an.skipped] == ["embeddings.token_type_embeddings.weight"]
    assert "embeddings.token_type_embeddings.weight" not in {lm.key for lm in an.layers}
    back = type(an).from_json(an.to_json())
    assert back.skipped == an.skipped and back.summary.means == an.summary.means


def test_rank_loss_counts_float32_rounding_as_lost() -> None:
    """A planted rank-r matrix stored in float32: rank_loss = M - r. WeightWatcher's float64
    epsilon would count the float32 rounding noise as rank (its rank_loss is 0 here)."""
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((300, 7)) @ rng.standard_normal((7, 200))).astype(np.float32)
    S = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    lm = layer_metrics(S, W.shape, MatrixMeta("w"))
    assert lm.numerical_rank == 7 and lm.rank_loss == 200 - 7
    ww_rank = int(np.count_nonzero(S > S.max() * 300 * np.finfo(np.float64).eps))
    assert ww_rank == 200  # the float64 criterion sees a full-rank matrix
    assert lm.sv_max == S.max() and lm.sv_min == S.min()
    assert lm.weak_rank_loss == int(np.count_nonzero(S**2 < 1e-6)) > 0


def test_option_checks() -> None:
    with pytest.raises(ValidationError, match="mp_method must be one of"):
        AnalyzeOptions(mp_method="kde")
    with pytest.raises(ValidationError, match="max_n must be >= 1"):
        AnalyzeOptions(max_n=0)
    with pytest.raises(ValidationError, match="weak_rank_tol must be >= 0"):
        AnalyzeOptions(weak_rank_tol=-1.0)


def test_cli_flags(minilm_path: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from spectra.cli.main import app

    out = tmp_path / "rep"
    args = ["report", str(minilm_path), "--out", str(out), "--include", "embeddings.*"]
    flags = ["--min-evals", "8", "--mp-fit", "--mp-method", "ww", "--weak-rank-tol", "0.01"]
    res = CliRunner().invoke(app, [*args, *flags, "--format", "json,md", "--no-cache", "-q"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "metrics.json").read_text())
    assert data["skipped"] == [
        {
            "key": "embeddings.token_type_embeddings.weight",
            "shape": [2, 384],
            "reason": "min(m, n) = 2 < min_evals = 8",
        }
    ]
    assert r"token\_type\_embeddings.weight: min(m, n) = 2" in (out / "report.md").read_text()
    options = data["options"]
    assert (options["min_evals"], options["mp_method"], options["weak_rank_tol"]) == (8, "ww", 0.01)
    lib = analyze(
        minilm_path,
        AnalyzeOptions(include=("embeddings.*",), min_evals=8, weak_rank_tol=0.01, device="cpu"),
        cache=None,
    )
    for row in data["layers"]:
        assert row["sigma_mp"] > 0 and 0 < row["mp_softrank"] < 1
        want = int(np.count_nonzero(lib.esds[row["key"]] < 0.01))
        assert row["weak_rank_loss"] == want
    assert any(0 < row["weak_rank_loss"] < min(row["shape"]) for row in data["layers"])
    assert set(data["summary"]["means"]) >= {"alpha", "mp_softrank"}
    bad = CliRunner().invoke(app, [*args, "--mp-method", "kde", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "mp_method must be one of" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
