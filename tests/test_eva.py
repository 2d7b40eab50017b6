"""EVA (arXiv 2410.07170): principal input directions, rank redistribution, output unchanged."""

from __future__ import annotations

import pytest
import torch
from _adapt_fixtures import one_thread  # noqa: F401

from spectra.adapt.eva import (
    adjusted_alphas,
    components_per_layer,
    convergence_ranks,
    eva_factors,
    eva_ranks,
    redistribute_ranks,
)
from spectra.adapt.registry import InitContext, get_initializer
from spectra.adapt.stats import CalibrationStats, IncrementalSVD
from spectra.errors import ValidationError


def _planted(features: int, top: int, strength: float, seed: int):
    """Rows with covariance Q diag(strength.. for top, 1 for the rest) Q^T, Q random orthogonal."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(features, features, generator=g, dtype=torch.float64))
    scales = torch.ones(features, dtype=torch.float64)
    scales[:top] = torch.linspace(strength, strength / 2, top, dtype=torch.float64)

    def rows(n: int) -> torch.Tensor:
        return (torch.randn(n, features, generator=g, dtype=torch.float64) * scales) @ Q.T + 5.0

    return Q[:, :top], rows


def _run(rows, k: int, features: int, batches: int, tau: float = 0.99) -> IncrementalSVD:
    svd = IncrementalSVD(k, features, tau=tau)
    for _ in range(batches):
        svd.update(rows(64))
    return svd


def test_a_spans_the_planted_principal_directions():
    top, rows = _planted(32, 4, 8.0, seed=0)
    svd = _run(rows, 4, 32, batches=10)
    state = svd.state()
    A, B = eva_factors(state, 4, out_features=20)
    assert A.shape == (4, 32) and B.shape == (20, 4) and not B.any()
    # Subspace cosines between row space of A and the planted directions (all principal angles).
    Qa, _ = torch.linalg.qr(A.double().T)
    cosines = torch.linalg.svdvals(Qa.T @ top)
    assert float(cosines.min()) >= 0.99
    assert svd.converged()
    # Negative control: one small batch of isotropic-looking data does not find them.
    _, noise = _planted(32, 4, 1.05, seed=1)
    weak = _run(noise, 4, 32, batches=1)
    assert not weak.converged()


def test_redistribution_sums_to_budget_and_follows_concentrated_variance():
    # "peaked" has 8 strong input directions, "mid" 6 weaker ones, "flat" is isotropic.
    _, peaked = _planted(24, 8, 10.0, seed=2)
    _, flat = _planted(24, 3, 1.0, seed=3)
    ranks = {"peaked": 4, "flat": 4, "mid": 4}
    _, mid = _planted(24, 6, 3.0, seed=4)
    evr = {
        name: _run(fn, components_per_layer(ranks)[name], 24, 6).state().explained_variance_ratio()
        for name, fn in (("peaked", peaked), ("flat", flat), ("mid", mid))
    }
    new = redistribute_ranks(evr, ranks, rho=2.0)
    assert sum(new.values()) == sum(ranks.values())
    assert new["peaked"] > new["flat"] and new["mid"] > new["flat"]
    assert all(r <= 8 for r in new.values())  # never more than round(rho * r) components
    # The kept components are exactly the global top-12 explained-variance ratios.
    pool = sorted((float(v) for e in evr.values() for v in e[:8]), reverse=True)
    kept = [float(v) for name, e in evr.items() for v in e[: new[name]]]
    assert sorted(kept, reverse=True) == pool[:12]
    # rho = 1 leaves the ranks as they were.
    assert redistribute_ranks(evr, ranks, rho=1.0) == ranks
    alphas = adjusted_alphas(16.0, ranks, new)
    assert all(alphas[n] / new[n] == 16.0 / 4 for n in alphas)  # scale alpha / r unchanged
    assert set(alphas) == {n for n, r in new.items() if r > 0}


def test_rank_zero_layers_and_caps():
    evr = {"a": torch.tensor([0.6, 0.3, 0.05]), "b": torch.tensor([0.01, 0.005, 0.001])}
    assert redistribute_ranks(evr, {"a": 1, "b": 1}, rho=2.0) == {"a": 2, "b": 0}
    assert redistribute_ranks(evr, {"a": 1, "b": 1}, rho=2.0, max_ranks={"a": 1}) == {
        "a": 1,
        "b": 1,
    }
    with pytest.raises(ValidationError, match="rho must be >= 1"):
        components_per_layer({"a": 2}, rho=0.5)


def test_eva_ranks_and_convergence_rule_share_leaders():
    g = torch.Generator().manual_seed(5)
    svd = IncrementalSVD(4, 6)
    scales = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1, 0.1], dtype=torch.float64)
    svd.update(torch.randn(50, 6, generator=g, dtype=torch.float64) * scales)
    svd.update(torch.randn(50, 6, generator=g, dtype=torch.float64) * scales)
    stats = CalibrationStats(svd={"q": svd.state()}, shared={"k": "q"}, skipped={"p": "2-D"})
    ranks = eva_ranks(stats, {"q": 2, "k": 2, "p": 2})
    assert ranks["p"] == 0 and ranks["q"] + ranks["k"] == 4
    need = convergence_ranks({"q": 2, "k": 2}, {"k": "q"})(
        {"q": svd.state().explained_variance_ratio()}
    )
    assert need == {"q": 2}


def test_initializer_leaves_base_and_output_unchanged():
    _, rows = _planted(16, 2, 6.0, seed=6)
    state = _run(rows, 4, 16, batches=4).state()
    W = torch.randn(10, 16, generator=torch.Generator().manual_seed(7))
    eva = get_initializer("eva")
    assert not eva.mutates_base and eva.needs_calibration
    f = eva.init(W, 3, 2.0, InitContext(key="lin.weight", module="lin", stats=state))
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(8))
    assert torch.equal(x @ W.T + 2.0 * (x @ f.A.T) @ f.B.T, x @ W.T)
    torch.testing.assert_close(f.A, state.components[:3].float())
    with pytest.raises(ValidationError, match="EVA rank 5 needs that many input components"):
        eva.init(W, 5, 1.0, InitContext(key="lin.weight", module="lin", stats=state))
    with pytest.raises(ValidationError, match="EVA needs the activation SVD of lin"):
        eva.init(W, 2, 1.0, InitContext(key="lin.weight", module="lin"))


def test_peft_loads_eva_adapter_on_the_unchanged_base(minilm_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    from spectra.adapt.calib_collect import CalibrationOptions, run_calibration
    from spectra.adapt.calib_data import load_texts
    from spectra.adapt.calib_model import load_model
    from spectra.formats.peft import AdapterContent, write_peft_adapter

    model, tok = load_model(minilm_path, "cpu")
    names = [f"encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]
    ranks = dict.fromkeys(names, 4)
    opts = CalibrationOptions(
        batch_size=4, svd_components=components_per_layer(ranks), max_batches=4
    )
    texts = load_texts(None, samples=16)
    stats = run_calibration(
        model, tok, texts, names, opts, convergence_ranks=convergence_ranks(ranks)
    )
    new = eva_ranks(stats, ranks)
    assert sum(new.values()) == 16
    modules = {n: r for n, r in new.items() if r > 0}
    factors = {}
    for name, r in modules.items():
        out_features = dict(model.named_modules())[name].weight.shape[0]
        factors[name] = eva_factors(stats.svd_state(name), r, out_features)
    alphas = adjusted_alphas(8.0, ranks, new)
    content = AdapterContent(factors, alphas, base_model_name_or_path=str(minilm_path))
    write_peft_adapter(tmp_path / "adapter", content)
    enc = AutoTokenizer.from_pretrained(minilm_path)(texts[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
        peft_model = PeftModel.from_pretrained(
            AutoModel.from_pretrained(minilm_path), tmp_path / "adapter"
        ).eval()
        got = peft_model(**enc).last_hidden_state
    assert float((ref - got).abs().max()) <= 1e-6
    loaded = dict(peft_model.named_modules())
    some = next(iter(modules))
    lora_a = loaded[f"base_model.model.{some}"].lora_A["default"].weight
    torch.testing.assert_close(lora_a, factors[some][0])


@pytest.mark.parametrize("rslora", [False, True])
def test_adjusted_alphas_keep_the_lora_scale(rslora: bool) -> None:
    """adjust_scaling_factors keeps each module's scale: alpha / r, or alpha / sqrt(r) under
    rsLoRA (where alpha * r_new / r_old would move the scale by sqrt(r_new / r_old))."""
    from spectra.formats.peft import lora_scale

    old = {"a": 4, "b": 4, "c": 4, "d": 4}
    new = {"a": 7, "b": 1, "c": 8, "d": 0}
    alphas = adjusted_alphas(16.0, old, new, rslora=rslora)
    assert set(alphas) == {"a", "b", "c"}
    want = lora_scale(16.0, 4, rslora=rslora)
    for name, a in alphas.items():
        assert lora_scale(a, new[name], rslora=rslora) == pytest.approx(want, rel=1e-12), name
    per_module = adjusted_alphas({"a": 4.0, "b": 2.0}, {"a": 4, "b": 2}, {"a": 1, "b": 8})
    assert per_module == pytest.approx({"a": 1.0, "b": 8.0})


@pytest.mark.parametrize("rslora", [False, True])
def test_eva_alphas_keep_the_scale_in_use(rslora: bool) -> None:
    """eva_alphas (what the init job's calibration step calls with the run's rsLoRA flag) gives
    every module that keeps a rank the LoRA scale it had before redistribution; without
    adjust_scaling one alpha stays, and alpha None means alpha = r_old."""
    from spectra.adapt.eva import eva_alphas
    from spectra.formats.peft import lora_scale

    moved = {"q.weight": 6, "v.weight": 2, "o.weight": 0}
    before = dict.fromkeys(moved, 4)
    alphas = eva_alphas(8.0, before, moved, rslora=rslora)
    assert alphas is not None and set(alphas) == {"q.weight", "v.weight"}
    for key, a in alphas.items():
        got = lora_scale(a, moved[key], rslora=rslora)
        assert got == pytest.approx(lora_scale(8.0, 4, rslora=rslora), rel=1e-12)
    assert eva_alphas(8.0, before, moved, adjust_scaling=False, rslora=rslora) is None
    kept = eva_alphas(None, before, moved, adjust_scaling=False, rslora=rslora)
    assert kept == {"q.weight": 4.0, "v.weight": 4.0}
