"""`spectra plan --for spectrum` on the real all-MiniLM-L6-v2 against an independent computation of
cognitivecomputations/spectrum's definition: its SNR from a float64 full SVD with torch's own
quantiles, and its selection loops replayed over the modules of the transformers model in
`named_modules` order (the tool's iteration), giving the same YAML text."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _adapt_fixtures import one_thread  # noqa: F401
from safetensors.torch import load_file

from spectra.adapt.spectrum_select import module_type, select_by_type, top_count, unfrozen_yaml
from spectra.analysis.snr import spectrum_snr
from spectra.errors import OutputError, ValidationError
from spectra.jobs.plan import PlanOptions, make_plan


@pytest.fixture(scope="module")
def weights(minilm_path: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(minilm_path / "model.safetensors"))
    return {k[: -len(".weight")]: v for k, v in tensors.items() if k.endswith(".weight")}


def _tool_snr(W: torch.Tensor) -> float:
    """The definition, step by step, in torch float64 (full SVD)."""
    W = W.unsqueeze(0) if W.ndim < 2 else W  # the tool's rule for a 1-D weight
    S = torch.linalg.svdvals(W.double())
    sigma = (torch.quantile(S, 0.75) - torch.quantile(S, 0.25)) / 1.349
    n, m = W.shape
    beta = n / m if n < m else m / n
    threshold = sigma * np.sqrt((1 + np.sqrt(beta)) ** 2)
    mask = S > threshold
    signal = S[mask].sum() if mask.any() else torch.tensor(0.0)
    noise = S[~mask].sum() if (~mask).any() else torch.tensor(1.0)
    return float((signal / noise) / S[0])


def _tool_yaml(names: list[str], snr: dict[str, float], percent: int) -> str:
    """The tool's loops: types sorted by category, substring scan (last type wins, first
    insertion keeps its place), per-type sort by SNR, int(n * percent / 100), the YAML."""
    types = set()
    for name in names:
        parts = name.split(".")
        index = next((i for i, p in enumerate(parts) if p.isdigit()), -1)
        types.add(".".join(parts[index + 1 :]) if index != -1 else name)
    categories: dict[str, list[str]] = {}
    for t in types:
        categories.setdefault(t.split(".")[0], []).append(t)
    ordered = [t for _, v in sorted(categories.items()) for t in sorted(v)]
    layer_snr: dict[str, dict] = {}
    for t in ordered:
        for name in names:
            if t in name:
                layer_snr[name] = {"type": t, "snr": snr[name]}
    by_type: dict[str, list] = {}
    for name, info in layer_snr.items():
        by_type.setdefault(info["type"], []).append((name, info["snr"]))
    lines = ["unfrozen_parameters:", "- ^lm_head.weight$", "- ^model.embed_tokens.weight$"]
    for t, layers in by_type.items():
        ranked = sorted(layers, key=lambda x: x[1], reverse=True)
        lines.append(f"# {t} layers")
        lines += [f"- {name}" for name, _ in ranked[: int(len(layers) * percent / 100)]]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def module_order(minilm_path: Path) -> list[str]:
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModel.from_pretrained(minilm_path)
    return [
        name
        for name, module in model.named_modules()
        if getattr(module, "weight", None) is not None
    ]


@pytest.fixture(scope="module")
def expected(weights: dict[str, torch.Tensor], module_order: list[str]) -> dict[str, float]:
    return {name: _tool_snr(weights[name]) for name in module_order}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spectrum_cache")


@pytest.mark.parametrize("percent", [50, 25, 100])
def test_spectrum_plan_equals_the_definition(
    minilm_path: Path,
    tmp_path: Path,
    cache: Path,
    expected: dict[str, float],
    module_order: list[str],
    percent: int,
) -> None:
    result = make_plan(
        minilm_path,
        PlanOptions(kind="spectrum", out=tmp_path / "u.yaml", fraction=percent / 100),
        cache=cache,
    )
    rows = {row["module"]: row for row in result.plan["modules"]}
    assert set(rows) == set(module_order)
    for name, snr in expected.items():
        assert rows[name]["snr"] == pytest.approx(snr, rel=1e-7), name
    text = (tmp_path / "u.yaml").read_text()
    tool = _tool_yaml(module_order, expected, percent)
    assert text.startswith(tool)  # then spectra's numbers, as YAML comments
    assert all(line.startswith("#") for line in text[len(tool) :].splitlines())
    yaml = pytest.importorskip("yaml")
    assert (
        yaml.safe_load(text)["unfrozen_parameters"] == yaml.safe_load(tool)["unfrozen_parameters"]
    )


def test_json_output_carries_numbers_and_definition(
    minilm_path: Path, tmp_path: Path, cache: Path
) -> None:
    result = make_plan(
        minilm_path, PlanOptions(kind="spectrum", out=tmp_path / "u.json"), cache=cache
    )
    data = json.loads((tmp_path / "u.json").read_text())
    assert data["definition"].startswith("snr = ")
    assert "spectrum" in data["reference"]
    chosen = {row["module"] for row in data["modules"] if row["chosen"]}
    assert chosen == set(result.chosen)
    assert data["unfrozen_parameters"] == [
        "^lm_head.weight$",
        "^model.embed_tokens.weight$",
        *[m for t in data["types"] for m in t["chosen"]],
    ]


def test_snr_edge_cases() -> None:
    # no value at or below the threshold: noise defaults to 1, as in the tool
    one = spectrum_snr(np.array([3.0]), (1, 8))
    assert one.snr == 1.0 and one.noise == 1.0 and one.sigma == 0.0
    # a zero matrix's noise sum is 0: the tool's inf
    assert spectrum_snr(np.array([0.0, 0.0]), (2, 2)).snr == float("inf") or np.isnan(
        spectrum_snr(np.array([0.0, 0.0]), (2, 2)).snr
    )
    with pytest.raises(ValidationError):
        spectrum_snr(np.array([np.nan]), (1, 1))


def test_type_rules() -> None:
    assert module_type("model.layers.3.self_attn.q_proj") == "self_attn.q_proj"
    assert module_type("lm_head") == "lm_head"
    assert top_count(3, 0.5) == 1 and top_count(1, 0.5) == 0 and top_count(7, 1.0) == 7
    assert top_count(100, 0.29) == 29  # int(100 * 29 / 100), not int(100 * 0.29) = 28
    paths = ["m.0.dense", "m.1.dense", "m.0.attn.dense", "m.1.attn.dense"]
    snr = {"m.0.dense": 1.0, "m.1.dense": 2.0, "m.0.attn.dense": 3.0, "m.1.attn.dense": 0.5}
    sel = select_by_type(paths, snr, 0.5)
    # "dense" is scanned after "attn.dense" (category order) and contains it: it takes those
    # modules too, which keep their first (earlier) scan position
    assert [(s.type, s.modules, s.chosen) for s in sel] == [
        (
            "dense",
            ("m.0.attn.dense", "m.1.attn.dense", "m.0.dense", "m.1.dense"),
            ("m.0.attn.dense", "m.1.dense"),
        )
    ]
    assert unfrozen_yaml(sel).endswith("# dense layers\n- m.0.attn.dense\n- m.1.dense\n")


def test_spectrum_refusals(minilm_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="fraction must be in"):
        PlanOptions(kind="spectrum", out=tmp_path / "u.yaml", fraction=0.0)
    (tmp_path / "u.yaml").write_text("x")
    with pytest.raises(OutputError, match="--force"):
        make_plan(minilm_path, PlanOptions(kind="spectrum", out=tmp_path / "u.yaml"), cache=False)
    assert (tmp_path / "u.yaml").read_text() == "x"
    with pytest.raises(OutputError, match="folder"):
        make_plan(minilm_path, PlanOptions(kind="spectrum", out=tmp_path), cache=False)
