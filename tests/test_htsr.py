"""Per-matrix metrics, MP edge, randomized control, outliers and the model summary."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from spectra.analysis.htsr import MatrixMeta, layer_metrics, numerical_rank, spectral_entropy
from spectra.analysis.mp import mp_fit, mp_quantiles
from spectra.analysis.outliers import outlier_ratio
from spectra.analysis.randomized import esd_distance, randomized_control, shuffle_entries
from spectra.analysis.results import Analysis, LayerMetrics
from spectra.analysis.summary import model_summary
from spectra.errors import ValidationError


def _svals(W: np.ndarray) -> np.ndarray:
    return np.linalg.svd(W, compute_uv=False)


def test_layer_metrics_follow_the_definitions() -> None:
    rng = np.random.default_rng(0)
    W = rng.standard_t(3, size=(96, 64))
    S = _svals(W)
    lm = layer_metrics(S, W.shape, MatrixMeta("blk.0.q", role="q", layer=0, dtype="F32"))
    lam = S**2
    assert lm.num_evals == 64 and lm.shape == (96, 64)
    assert lm.log_norm == pytest.approx(math.log10(lam.sum()), rel=1e-12)
    assert lm.log_spectral_norm == pytest.approx(math.log10(lam.max()), rel=1e-12)
    assert lm.stable_rank == pytest.approx(lam.sum() / lam.max(), rel=1e-12)
    assert lm.alpha_weighted == pytest.approx(lm.alpha * math.log10(lam.max()), rel=1e-12)
    assert lm.log_alpha_norm == pytest.approx(math.log10(np.sum(lam**lm.alpha)), rel=1e-10)
    p = lam / lam.sum()
    assert lm.entropy == pytest.approx(-np.sum(p * np.log(p)) / math.log(64), rel=1e-12)
    assert lm.numerical_rank == 64
    assert lm.fit_status == "ok" and lm.xmax == pytest.approx(lam.max(), rel=1e-15)
    # order of S does not matter
    assert (
        layer_metrics(S[::-1], W.shape, MatrixMeta("blk.0.q", role="q", layer=0, dtype="F32")) == lm
    )


def test_rank_entropy_and_rank_deficiency() -> None:
    rng = np.random.default_rng(1)
    W = rng.standard_normal((80, 3)) @ rng.standard_normal((3, 40))  # rank 3
    S = _svals(W)
    assert numerical_rank(S, 80) == 3
    lm = layer_metrics(S, (80, 40), MatrixMeta("lowrank"))
    assert lm.numerical_rank == 3
    assert "rank-deficient" in lm.warnings
    top = S[:3] ** 2
    p = top / top.sum()
    assert lm.entropy == pytest.approx(-np.sum(p * np.log(p)) / math.log(3), rel=1e-12)
    assert spectral_entropy(np.array([4.0, 0.0]), 1) == 0.0
    # flat spectrum: entropy 1
    assert spectral_entropy(np.ones(10), 10) == pytest.approx(1.0, rel=1e-14)


def test_warnings_from_alpha_band() -> None:
    # Pareto tails of known exponent drive the fit into each band
    rng = np.random.default_rng(2)
    heavy = np.sqrt(rng.pareto(0.6, 200) + 1.0)  # density exponent 1.6
    light = np.sqrt(rng.pareto(8.0, 200) + 1.0)  # density exponent 9
    lm_h = layer_metrics(heavy, (400, 200), MatrixMeta("h"))
    lm_l = layer_metrics(light, (400, 200), MatrixMeta("l"))
    assert lm_h.alpha < 2 and "over-trained" in lm_h.warnings
    assert lm_l.alpha > 6 and "under-trained" in lm_l.warnings


def test_non_finite_and_wrong_length() -> None:
    S = np.array([3.0, np.inf] + [1.0] * 14)
    lm = layer_metrics(S, (16, 20), MatrixMeta("bad"))
    assert lm.warnings == ("non-finite",) and lm.fit_status == "failed"
    assert lm.alpha is None and lm.log_norm is None
    assert json.loads(json.dumps(lm.to_dict(), allow_nan=False))["alpha"] is None
    with pytest.raises(ValidationError, match="all min\\(m, n\\) = 16 singular values"):
        layer_metrics(np.ones(8), (16, 20), MatrixMeta("topk"))


def test_small_matrix_is_skipped_not_failed() -> None:
    lm = layer_metrics(np.arange(1.0, 6.0), (5, 7), MatrixMeta("tiny"))
    assert lm.fit_status == "skipped" and lm.alpha is None
    assert lm.warnings == ()
    assert lm.log_norm == pytest.approx(math.log10(55.0))


def test_mp_quantiles_match_sampled_law() -> None:
    rng = np.random.default_rng(3)
    W = rng.standard_normal((2000, 500))
    ev = _svals(W) ** 2 / 2000  # sigma = 1, Q = 4
    levels = (0.1, 0.5, 0.9)
    np.testing.assert_allclose(mp_quantiles(4.0, levels), np.quantile(ev, levels), rtol=0.02)


@pytest.mark.parametrize("shape", [(300, 300), (600, 150)])
def test_mp_fit_counts_planted_spikes(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(4)
    W = rng.standard_normal(shape)
    noise = mp_fit(_svals(W) ** 2, shape)
    assert noise.num_spikes == 0
    assert noise.sigma == pytest.approx(1.0, abs=0.03)
    U, S, Vh = np.linalg.svd(W, full_matrices=False)
    S[:4] *= 5.0
    spiked = mp_fit(_svals((U * S) @ Vh) ** 2, shape)
    assert spiked.num_spikes == 4
    # the bulk edge in original units does not move with the spikes
    assert spiked.bulk_max == pytest.approx(noise.bulk_max, rel=0.02)
    assert mp_fit(np.zeros(5), (5, 5)) is None


def test_shuffle_is_seeded_permutation() -> None:
    W = torch.arange(12.0).reshape(3, 4)
    a = shuffle_entries(W, seed=5)
    assert torch.equal(a, shuffle_entries(W, seed=5))
    assert not torch.equal(a, shuffle_entries(W, seed=6))
    assert torch.equal(a.flatten().sort().values, W.flatten())


def test_esd_distance_properties() -> None:
    p = np.array([1.0, 2.0, 3.0])
    assert esd_distance(p, p) == 0.0
    assert esd_distance(p, 10 * p) == pytest.approx(0.0, abs=1e-15)  # scale-free
    # by hand: p = (0, 0, 1), q = (0, 1/2, 1/2), m = (0, 1/4, 3/4)
    js = (math.log(4 / 3) + 0.5 * math.log(2) + 0.5 * math.log(2 / 3)) / 2
    d = esd_distance(np.array([0.0, 0.0, 2.0]), np.array([0.0, 3.0, 3.0]))
    assert d == pytest.approx(math.sqrt(js), rel=1e-14)
    with pytest.raises(ValidationError, match="differ in length"):
        esd_distance(p, p[:2])


def test_randomized_control_structured_vs_noise() -> None:
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(120, 80, generator=g, dtype=torch.float64)
    structured = noise + 3.0 * torch.randn(120, 1, dtype=torch.float64, generator=g) @ torch.randn(
        1, 80, dtype=torch.float64, generator=g
    )

    def svals(W: torch.Tensor) -> np.ndarray:
        return torch.linalg.svdvals(W).numpy()

    _, d_noise = randomized_control(noise, svals(noise) ** 2, svals, seed=0)
    rand_ev, d_struct = randomized_control(structured, svals(structured) ** 2, svals, seed=0)
    assert rand_ev.shape == (80,) and np.all(np.diff(rand_ev) <= 0)
    assert rand_ev.sum() == pytest.approx(float((structured**2).sum()), rel=1e-10)
    assert d_noise < 0.05 < d_struct


def test_outlier_ratio() -> None:
    W = torch.ones(10, 10)
    W[0, 0] = 1000.0
    assert outlier_ratio(W) == 0.01
    assert outlier_ratio(torch.ones(4, 4)) == 0.0
    assert outlier_ratio(torch.zeros(3, 3)) is None
    act = torch.ones(10)
    act[0] = 0.0  # the outlier's input is dead: no longer an outlier
    assert outlier_ratio(W, act_norms=act) == 0.0
    with pytest.raises(ValidationError, match="act_norms must have shape \\(10,\\)"):
        outlier_ratio(W, act_norms=torch.ones(3))
    with pytest.raises(ValidationError, match="2-D"):
        outlier_ratio(torch.ones(3))


def _lm(key: str, role: str, layer: int, alpha: float | None, **kw: object) -> LayerMetrics:
    base = layer_metrics(
        np.linspace(1.0, 2.0, 16), (16, 16), MatrixMeta(key, role=role, layer=layer)
    )
    warnings = ()
    if alpha is not None and alpha > 6:
        warnings = ("under-trained",)
    fields = {**base.__dict__, "alpha": alpha, "warnings": warnings, **kw}
    return LayerMetrics(**fields)


def test_summary_groups_and_standouts() -> None:
    layers = [_lm(f"l{i}.q", "q", i, 3.0 + 0.01 * i) for i in range(6)]
    layers += [_lm(f"l{i}.up", "up", i, 4.0 + 0.1 * i) for i in range(5)]
    layers.append(_lm("l5.up", "up", 5, 9.0, outlier_ratio=0.02))
    s = model_summary(layers)
    assert s.num_matrices == 12 and s.num_warned == 1
    assert s.warned_share == pytest.approx(1 / 12)
    assert s.by_role["q"].count == 6
    assert s.by_role["up"].median_alpha == pytest.approx(4.25)
    assert s.by_depth[5].count == 2 and s.by_depth[5].warned == 1
    assert s.mean_alpha == pytest.approx(np.mean([lm.alpha for lm in layers]))
    first = s.standouts[0]
    assert (first["key"], first["metric"], first["value"]) == ("l5.up", "alpha", 9.0)
    robust = [x for x in s.standouts if x["metric"] == "alpha" and "robust z" in x["reason"]]
    assert [x["key"] for x in robust] == ["l5.up"]
    assert s.standouts[-1]["metric"] == "outlier_ratio"


def test_analysis_json_csv_round_trip(tmp_path) -> None:
    layers = [_lm("a", "q", 0, 3.0), _lm("b", "k", 1, None, fit_status="failed")]
    an = Analysis(source="x", layers=layers, summary=model_summary(layers), options={"k": 1})
    text = an.to_json(tmp_path / "m.json")
    back = Analysis.from_json(tmp_path / "m.json")
    assert back.layers == layers and back.summary == an.summary
    assert json.loads(text)["layers"][1]["alpha"] is None
    csv_text = an.to_csv(tmp_path / "m.csv")
    lines = csv_text.splitlines()
    assert lines[0].startswith("key,name,role,layer,shape")
    assert len(lines) == 3 and ",16x16," in lines[1]
    df = an.to_pandas()
    assert list(df["key"]) == ["a", "b"] and math.isnan(df["alpha"][1])
    with pytest.raises(ValidationError, match="no matrix 'zz'"):
        an.layer("zz")


def test_outlier_ratio_chunked_equals_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    import spectra.analysis.outliers as outliers

    g = torch.Generator().manual_seed(0)
    W = (torch.randn(64, 48, generator=g) ** 3).to(torch.bfloat16)
    score = W.float().abs()
    want = int((score > 13.0 * score.mean()).sum()) / W.numel()
    assert want > 0
    assert outlier_ratio(W) == want
    monkeypatch.setattr(outliers, "CHUNK_ELEMENTS", 100)  # 2 rows per block
    assert outlier_ratio(W) == want


def _outlier_ratio_as_before(W: torch.Tensor, multiplier: float) -> float | None:
    """The outlier ratio as computed before the narrow-dtype count (float32 scores, one block)."""
    score = W.to(torch.float32).abs()
    mean = score.sum(dtype=torch.float64) / W.numel()
    if not torch.isfinite(mean) or mean <= 0:
        return None
    return int(torch.count_nonzero(score > multiplier * mean.to(torch.float32))) / W.numel()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_outlier_ratio_of_a_narrow_dtype_counts_as_in_float32(dtype: torch.dtype) -> None:
    """bf16/fp16 W are counted against the largest value of their dtype <= the float32 cut;
    the counts equal the float32 comparison's, also with entries on and next to the cut
    (few distinct values: each cut here lands on, just above or just below one of them)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randint(-9, 10, (64, 48), generator=g).to(dtype) * 0.25
    W[0, 0] = 40.0
    mean = float(W.to(torch.float32).abs().sum(dtype=torch.float64)) / W.numel()
    edges = 0
    for k in [v * 0.25 for v in range(1, 40)] + [2.25 + 1e-3, 2.25 - 1e-3]:
        for multiplier in (k / mean, k / mean * (1 + 1e-7), k / mean * (1 - 1e-7)):
            want = _outlier_ratio_as_before(W, multiplier)
            assert outlier_ratio(W, multiplier=multiplier) == want, (k, multiplier)
            cut = multiplier * (W.to(torch.float32).abs().sum(dtype=torch.float64) / W.numel())
            edges += int(bool((W.to(torch.float32).abs() == cut.to(torch.float32)).any()))
    assert edges > 0  # some cut fell exactly on an entry
    huge = W.clone()
    huge[1, 1] = 6e4 if dtype == torch.float16 else 1e30  # a cut above the dtype's range
    assert outlier_ratio(huge, multiplier=1e3) == _outlier_ratio_as_before(huge, 1e3)
