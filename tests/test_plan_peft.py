"""`spectra plan --for peft` on the real all-MiniLM-L6-v2: the ranks are those `spectra init`
gives for the same options, and PEFT itself (LoraConfig.from_pretrained / LoraConfig(**json) +
get_peft_model) adapts exactly the planned modules with the planned ranks and alphas."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _adapt_fixtures import one_thread  # noqa: F401

pytest.importorskip("peft")
pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModel  # noqa: E402

from spectra.adapt.plan import select_targets  # noqa: E402
from spectra.adapt.ranks import AllocationOptions, allocated_ranks  # noqa: E402
from spectra.errors import OutputError, ValidationError  # noqa: E402
from spectra.jobs.init import InitOptions, init_adapter  # noqa: E402
from spectra.jobs.plan import PlanOptions, make_plan  # noqa: E402
from spectra.sources.checkpoint import Checkpoint  # noqa: E402

TARGETS = "q,k,v,o,up,down"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("plan_cache")


def _peft_ranks(minilm: Path, config: LoraConfig) -> dict[str, tuple[int, float]]:
    """module path -> (r, scaling) of every module PEFT wrapped with a LoRA."""
    model = get_peft_model(AutoModel.from_pretrained(minilm), config)
    out = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            out[name] = (module.lora_A["default"].weight.shape[0], module.scaling["default"])
    return out


@pytest.mark.parametrize(
    ("allocator", "budget", "unit"),
    [
        ("energy", None, "rank"),
        ("alpha-power", 300, "rank"),
        ("alpha-linear", None, "rank"),
        ("lamda++", None, "rank"),
        ("energy", 150_000, "params"),
    ],
)
def test_ranks_equal_the_ranks_init_allocates(
    minilm_path: Path, tmp_path: Path, cache: Path, allocator: str, budget: int | None, unit: str
) -> None:
    options = PlanOptions(
        kind="peft",
        out=tmp_path / "plan",
        targets=TARGETS,
        rank=8,
        allocator=allocator,
        budget=budget,
        budget_unit=unit,
        min_rank=2,
        max_rank=40,
    )
    plan = make_plan(minilm_path, options, cache=cache)
    got = {m["key"]: m["rank"] for m in plan.plan["modules"]}
    with Checkpoint.open(str(minilm_path)) as ckpt:
        selected = select_targets(ckpt.matrices(), TARGETS)
        want, _ = allocated_ranks(
            ckpt,
            selected,
            AllocationOptions(allocator, 8, budget, unit, 2, 40),
            torch.device("cpu"),
        )
    assert want is not None
    assert got == {k: r for k, r in want.items() if r > 0}
    assert len(set(got.values())) > 1  # an allocation that actually varies


def test_ranks_equal_those_in_the_adapter_init_writes(minilm_path: Path, tmp_path: Path) -> None:
    targets = "q,v"
    init = init_adapter(
        minilm_path,
        InitOptions(out=tmp_path / "init", targets=targets, allocator="energy", rank=6),
    )
    plan = make_plan(
        minilm_path,
        PlanOptions(
            kind="peft", out=tmp_path / "plan", targets=targets, allocator="energy", rank=6
        ),
        cache=False,
    )
    config = json.loads((plan.out / "adapter_config.json").read_text())
    init_config = LoraConfig.from_pretrained(init.adapter_dir)
    mine = LoraConfig.from_pretrained(plan.out)
    assert _peft_ranks(minilm_path, mine) == _peft_ranks(minilm_path, init_config)
    assert config["r"] in {m.rank for m in init.plan.modules}


@pytest.mark.parametrize(
    ("targets", "layers", "allocator"),
    [
        (TARGETS, None, "energy"),
        (TARGETS, [1, 2, 4], "alpha-linear"),
        ("down", [0, 5], None),  # `output.dense` also matches attention.output.dense: excluded
        ("o,down,other", None, "uniform"),  # pooler.dense: outside the numbered layers
    ],
)
def test_peft_adapts_exactly_the_planned_modules(
    minilm_path: Path,
    tmp_path: Path,
    cache: Path,
    targets: str,
    layers: list[int] | None,
    allocator: str | None,
) -> None:
    options = PlanOptions(
        kind="peft",
        out=tmp_path / "plan",
        targets=targets,
        layers=layers,
        rank=8,
        allocator=allocator,
        alpha=16.0 if allocator is None else None,
    )
    result = make_plan(minilm_path, options, cache=cache)
    want = {m["module"]: (m["rank"], m["scale"]) for m in result.plan["modules"]}
    raw = json.loads((result.out / "adapter_config.json").read_text())
    for config in (LoraConfig.from_pretrained(result.out), LoraConfig(**raw)):
        got = _peft_ranks(minilm_path, config)
        assert got.keys() == want.keys()
        for module, (r, scale) in want.items():
            assert got[module][0] == r
            assert got[module][1] == pytest.approx(scale, rel=1e-12)
    if layers is not None:
        assert {m["layer"] for m in result.plan["modules"]} == set(layers)
        if targets == TARGETS:
            assert raw["layers_to_transform"] == layers
    if targets == "down":
        assert raw["exclude_modules"]  # the attention.output.dense modules of layers 0 and 5
    numbers = json.loads((result.out / "spectra_plan.json").read_text())
    assert numbers["definition"] and numbers["reference"]
    assert numbers["lora_config"] == raw


def test_peft_refusals(minilm_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="--layers \\[9\\]"):
        make_plan(
            minilm_path, PlanOptions(kind="peft", out=tmp_path / "a", layers=[9]), cache=False
        )
    with pytest.raises(ValidationError, match="--budget needs --allocate"):
        PlanOptions(kind="peft", out=tmp_path / "a", budget=10)
    with pytest.raises(ValidationError, match="unknown allocator"):
        PlanOptions(kind="peft", out=tmp_path / "a", allocator="nope")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    with pytest.raises(OutputError):
        make_plan(minilm_path, PlanOptions(kind="peft", out=tmp_path / "taken"), cache=False)
