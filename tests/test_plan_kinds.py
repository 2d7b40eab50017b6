"""`spectra plan` --for kappa / owlore / lisa / alphapruning on the real all-MiniLM-L6-v2:
kappa equals PEFT's own `find_kappa_target_modules`; the others equal independent computations of
their papers' definitions (OwLore's p = D / sum D from outlier counts, LISA's uniform 1 / N,
AlphaPruning's alpha_peak loop and linear mapping) from the weights read with safetensors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _adapt_fixtures import one_thread  # noqa: F401
from safetensors.torch import load_file

from spectra.adapt.sparsity import sparsity_ratios
from spectra.analysis.alpha_peak import alpha_peak
from spectra.errors import ValidationError
from spectra.jobs.plan import PlanOptions, make_plan

ORDER = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kinds_cache")


@pytest.fixture(scope="module")
def layers(minilm_path: Path) -> dict[int, list[tuple[str, torch.Tensor]]]:
    """layer -> [(module path, W)] in BERT's module order (query, key, value, attention output,
    intermediate, output)."""
    tensors = load_file(str(minilm_path / "model.safetensors"))
    out: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for i in range(6):
        prefix = f"encoder.layer.{i}."
        names = [prefix + ("attention.self." + n if n in ORDER[:3] else n) for n in ORDER]
        out[i] = [(n, tensors[n + ".weight"]) for n in names]
    return out


def test_kappa_equals_peft_find_kappa_target_modules(
    minilm_path: Path, tmp_path: Path, cache: Path
) -> None:
    peft_helpers = pytest.importorskip("peft.helpers")
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModel.from_pretrained(minilm_path)
    # top_p = 1: every linear module, lowest kappa first; a smaller top_p takes PEFT's
    # max(1, int(n * top_p)) first of them
    ordered = peft_helpers.find_kappa_target_modules(model, top_p=1.0, show_progress=False)
    assert ordered["target_parameters"] is None  # no fused MoE weights
    order = ordered["target_modules"]
    for top_p in (0.2, 0.5, 1.0):
        result = make_plan(
            minilm_path,
            PlanOptions(kind="kappa", out=tmp_path / f"k{top_p}.json", fraction=top_p),
            cache=cache,
        )
        assert result.plan["target_modules"] == order[: max(1, int(len(order) * top_p))]
        assert result.plan["target_parameters"] is None
    data = json.loads((tmp_path / "k1.0.json").read_text())
    mine = {row["module"]: row["kappa"] for row in data["modules"]}
    assert sorted(mine) == sorted(order)
    modules = dict(model.named_modules())
    for name in order:
        # PEFT: float32 svdvals (kappa off by ~eps32 * kappa relative); spectra: float64 Gram
        # eigenvalues, equal to a float64 full SVD up to ~eps64 * kappa^2
        S = torch.linalg.svdvals(modules[name].weight.detach().double())
        exact = float(S[0] / (S[-1] + 1e-8))
        assert mine[name] == pytest.approx(exact, rel=max(1e-12, 10 * 2.2e-16 * exact**2))


def test_kappa_max_dim_skips_big_matrices(minilm_path: Path, tmp_path: Path, cache: Path) -> None:
    result = make_plan(
        minilm_path,
        PlanOptions(kind="kappa", out=tmp_path / "k.json", max_dim=512, fraction=1.0),
        cache=cache,
    )
    small = [
        f"encoder.layer.{i}.attention.{n}" for i in range(6) for n in ORDER[:4] if "." not in n
    ]
    small += [f"encoder.layer.{i}.attention.output.dense" for i in range(6)]
    small = [m.replace("attention.query", "attention.self.query") for m in small]
    small = [m.replace("attention.key", "attention.self.key") for m in small]
    small = [m.replace("attention.value", "attention.self.value") for m in small]
    assert sorted(result.chosen) == sorted([*small, "pooler.dense"])  # no 1536-wide matrix


@pytest.mark.parametrize("multiplier", [13.0, 5.0])
def test_owlore_probabilities_equal_the_outlier_definition(
    minilm_path: Path, tmp_path: Path, cache: Path, layers: dict, multiplier: float
) -> None:
    D = []
    for i in range(6):
        count = total = 0
        for _, W in layers[i]:
            A = W.double().abs()
            count += int((A > multiplier * A.mean()).sum())
            total += W.numel()
        D.append(count / total)
    p = np.array(D) / sum(D)
    result = make_plan(
        minilm_path,
        PlanOptions(
            kind="owlore",
            out=tmp_path / "o.json",
            outlier_multiplier=multiplier,
            activated_layers=3,
        ),
        cache=cache,
    )
    data = json.loads((tmp_path / "o.json").read_text())
    np.testing.assert_allclose(data["ratios"], D, rtol=1e-12)
    np.testing.assert_allclose(data["probabilities"], p, rtol=1e-12)
    assert data["activated_layers"] == 3 and data["num_layers"] == 6
    assert math.isclose(sum(data["probabilities"]), 1.0)
    assert result.plan["definition"].startswith("p_l = D_l / sum D")
    # numpy accepts them as OwLore's trainer passes them
    np.random.default_rng(0).choice(6, 3, replace=False, p=data["probabilities"])


def test_lisa_is_uniform(minilm_path: Path, tmp_path: Path) -> None:
    make_plan(minilm_path, PlanOptions(kind="lisa", out=tmp_path / "l.json"), cache=False)
    data = json.loads((tmp_path / "l.json").read_text())
    assert data["probabilities"] == [1 / 6] * 6
    with pytest.raises(ValidationError, match="between 1 and the 6 layers"):
        make_plan(
            minilm_path,
            PlanOptions(kind="lisa", out=tmp_path / "m.json", activated_layers=7),
            cache=False,
        )


def _hill_peak_loop(evals: np.ndarray, bins: int = 100) -> float:
    """AlphaPruning's xmin_peak loop written out candidate by candidate (float64)."""
    eigs = torch.sort(torch.as_tensor(evals, dtype=torch.float64)).values
    N = len(eigs)
    log_eigs = torch.log(eigs)
    h = torch.log10(eigs)
    counts = torch.histc(h, bins, min=h.min().item(), max=h.max().item())
    edges = torch.linspace(h.min().item(), h.max().item(), bins + 1, dtype=torch.float64)
    xmin2 = 10 ** edges[torch.argmax(counts)]
    low, high = torch.log10(0.95 * xmin2), 1.5 * xmin2
    alphas, Ds = torch.zeros(N - 1, dtype=torch.float64), torch.ones(N - 1, dtype=torch.float64)
    for i, xmin in enumerate(eigs[:-1]):
        if xmin < low:
            continue
        if xmin > high:
            break
        n = float(N - i)
        alpha = 1 + n / (torch.sum(log_eigs[i:]) - n * log_eigs[i])
        alphas[i] = alpha
        if alpha > 1:
            seq = torch.arange(n, dtype=torch.float64)
            Ds[i] = torch.max(torch.abs(1 - (eigs[i:] / xmin) ** (-alpha + 1) - seq / n))
    return float(alphas[torch.argmin(Ds)])


def test_alpha_peak_equals_the_loop() -> None:
    rng = np.random.default_rng(0)
    for shape in [(300, 200), (64, 256), (500, 500)]:
        W = rng.standard_t(3, size=shape)
        evals = np.linalg.svd(W, compute_uv=False) ** 2
        assert alpha_peak(evals).alpha == pytest.approx(_hill_peak_loop(evals), rel=1e-10)


@pytest.fixture(scope="module")
def hill_metrics(layers: dict) -> tuple[list[float], list[int]]:
    """alpha_peak of every layer matrix (the loop, float64 full SVD) and its entries."""
    metrics, sizes = [], []
    for i in range(6):
        for _, W in layers[i]:
            S = torch.linalg.svdvals(W.double())
            metrics.append(_hill_peak_loop((S**2).numpy()))
            sizes.append(W.numel())
    return metrics, sizes


@pytest.mark.parametrize("mapping", ["block_wise", "layer_wise"])
def test_alphapruning_equals_the_papers_mapping(
    minilm_path: Path,
    tmp_path: Path,
    cache: Path,
    layers: dict,
    hill_metrics: tuple[list[float], list[int]],
    mapping: str,
) -> None:
    metrics, sizes = hill_metrics
    q = np.array(metrics)
    if mapping == "block_wise":
        q = np.repeat(q.reshape(6, 6).mean(axis=1), 6)
    eps, s = 0.2, 0.6
    r = (q - q.min()) / (q.max() - q.min()) * (2 * eps) + (1 - eps)
    r = r * (sum(sizes) * s / np.dot(sizes, r))
    result = make_plan(
        minilm_path,
        PlanOptions(
            kind="alphapruning", out=tmp_path / "a.json", sparsity=s, epsilon=eps, mapping=mapping
        ),
        cache=cache,
    )
    data = json.loads((tmp_path / "a.json").read_text())
    assert [m["module"] for m in data["modules"]] == [n for i in range(6) for n, _ in layers[i]]
    np.testing.assert_allclose(data["metric_values"], metrics, rtol=1e-6)
    np.testing.assert_allclose(data["ratios"], r, rtol=1e-6)
    assert data["achieved_sparsity"] == pytest.approx(s, rel=1e-12)
    assert result.plan["reference"].startswith("AlphaPruning")


def test_sparsity_mapping_edges() -> None:
    r = sparsity_ratios([2.0, 2.0], [10, 30], [0, 1], target=0.5, eps=0.3)
    assert r.tolist() == [0.5, 0.5]
    with pytest.raises(ValidationError, match=">= 1"):
        sparsity_ratios([1.0, 5.0], [1000, 10], [0, 1], target=0.9, eps=0.9, mapping="layer_wise")
    with pytest.raises(ValidationError, match="target sparsity"):
        sparsity_ratios([1.0], [1], [0], target=1.0, eps=0.3)


def test_kappa_fused_moe_parameters_equal_peft(tmp_path: Path) -> None:
    """A 3-D expert stack: PEFT averages kappa over the experts and lists it in
    target_parameters; the 2-D linears go to target_modules."""
    peft_helpers = pytest.importorskip("peft.helpers")
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)

    class Experts(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(3, 32, 16, generator=g))
            self.down_proj = torch.nn.Parameter(torch.randn(3, 16, 16, generator=g))

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(16, 16, bias=False)
            self.o_proj = torch.nn.Linear(16, 16, bias=False)
            self.experts = Experts()

    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([Layer(), Layer()])})
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 16}))
    want = peft_helpers.find_kappa_target_modules(model, top_p=0.5, show_progress=False)
    result = make_plan(
        tmp_path, PlanOptions(kind="kappa", out=tmp_path / "k.json", fraction=0.5), cache=False
    )
    assert result.plan["target_modules"] == want["target_modules"]
    assert result.plan["target_parameters"] == want["target_parameters"]
    assert len(want["target_parameters"]) == 2
