"""`spectra init` on MoE experts: PEFT addresses transformers 5's fused 3-D expert parameters
through `target_parameters`; the adapter loads in PEFT 0.21 onto the residual base and
reproduces the original model; per-expert ranks (allocators) by zero-padded slots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _moe_fixtures import write_transformers_moe
from safetensors.torch import load_file

from spectra.adapt.expert_targets import StackShape, expert_delta, stack_factors
from spectra.errors import ValidationError
from spectra.jobs.init import InitOptions, init_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _logits(folder: Path, adapter: Path | None, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe_models")
    return {k: write_transformers_moe(root / k, k) for k in ("mixtral", "qwen2_moe", "gpt_oss")}


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_pissa_on_experts_loads_in_peft_and_reproduces_the_model(
    moe_models: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    folder = moe_models[kind]
    targets = "q,v,expert" + (",shared_expert" if kind == "qwen2_moe" else "")
    result = init_adapter(folder, InitOptions(out=tmp_path / "out", targets=targets, rank=3))
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    params = sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("down_proj", "gate_up_proj")
    )
    assert config["target_parameters"] == params
    modules = set(config["target_modules"])
    assert {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"} <= modules
    assert not any("experts" in m for m in modules)
    if kind == "qwen2_moe":
        assert "model.layers.1.mlp.shared_expert.down_proj" in modules
    # gate and up of one expert share gate_up_proj: rank 3 + 3; a whole slice: 3
    gate_up_rank = 3 if kind == "gpt_oss" else 6
    assert config["rank_pattern"]["model.layers.0.mlp.experts.gate_up_proj"] == gate_up_rank
    assert config["rank_pattern"]["model.layers.1.mlp.experts.down_proj"] == 3
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    want = _logits(folder, None, ids)
    got = _logits(result.residual_dir, result.adapter_dir, ids)
    assert (got - want).abs().max().item() < 1e-4
    # the residual alone is a different model (the adapter carries the top directions)
    assert (_logits(result.residual_dir, None, ids) - want).abs().max().item() > 1e-2
    # PEFT's own modules: one ParamWrapper per targeted expert parameter, our factors in them
    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(result.residual_dir, dtype=torch.float32),
        result.adapter_dir,
    )
    wrappers = [m for m in model.modules() if type(m).__name__ == "ParamWrapper"]
    assert sorted(f"{w.parameter_name}" for w in wrappers) == sorted(
        ["gate_up_proj", "down_proj"] * 2
    )
    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in saved


def test_stack_factors_is_what_peft_applies() -> None:
    """Our stacking against PEFT's own ParamWrapper delta on a bare 3-D parameter."""
    g = torch.Generator().manual_seed(3)
    E, N, H = 3, 5, 4
    parts = {
        (0, 0): (torch.randn(2, H, generator=g), torch.randn(N, 2, generator=g)),
        (0, 1): (torch.randn(1, H, generator=g), torch.randn(N, 1, generator=g)),
        (2, 1): (torch.randn(3, H, generator=g), torch.randn(N, 3, generator=g)),
    }
    A, B = stack_factors(StackShape(E, 2 * N, H, 3), parts, 2)
    want = torch.zeros(E, 2 * N, H)
    want[0, :N] = parts[(0, 0)][1] @ parts[(0, 0)][0]
    want[0, N:] = parts[(0, 1)][1] @ parts[(0, 1)][0]
    want[2, N:] = parts[(2, 1)][1] @ parts[(2, 1)][0]
    torch.testing.assert_close(expert_delta(A, B, E, 1.0), want)

    class Experts(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(E, 2 * N, H))

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = Experts()

    config = peft.LoraConfig(
        r=3, lora_alpha=3, target_modules=[], target_parameters=["experts.gate_up_proj"]
    )
    wrapped = peft.get_peft_model(Net(), config)
    layer = wrapped.base_model.model.experts
    layer.lora_A["default"].weight.data = A
    layer.lora_B["default"].weight.data = B
    torch.testing.assert_close(layer.get_delta_weight("default"), want)


def test_allocated_per_expert_ranks_pad_to_the_largest(
    moe_models: dict[str, Path], tmp_path: Path
) -> None:
    folder = moe_models["mixtral"]
    result = init_adapter(
        folder,
        InitOptions(
            out=tmp_path / "alloc",
            targets="expert",
            allocator="energy",
            budget=40,
            min_rank=1,
            max_rank=8,
        ),
    )
    ranks = {m.key: m.rank for m in result.plan.modules}
    assert len(ranks) == 2 * 4 * 3 and sum(ranks.values()) == 40
    assert len(set(ranks.values())) > 1  # per-expert ranks differ
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    for layer in range(2):
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        gate_up = max(ranks[f"{p}.{e}.w1.weight"] + ranks[f"{p}.{e}.w3.weight"] for e in range(4))
        down = max(ranks[f"{p}.{e}.w2.weight"] for e in range(4))
        pattern = config["rank_pattern"]
        assert pattern[f"model.layers.{layer}.mlp.experts.gate_up_proj"] == gate_up
        assert pattern[f"model.layers.{layer}.mlp.experts.down_proj"] == down
    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    A = saved["base_model.model.model.layers.0.mlp.experts.lora_A.weight"]  # down_proj
    R = config["rank_pattern"]["model.layers.0.mlp.experts.down_proj"]
    for e in range(4):
        r = ranks[f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"]
        block = A[e * R : (e + 1) * R]
        assert block[:r].abs().sum() > 0 and block[r:].abs().sum() == 0  # dead padded slots
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    got = _logits(result.residual_dir, result.adapter_dir, ids)
    assert (got - _logits(folder, None, ids)).abs().max().item() < 1e-4


def test_refusals(moe_models: dict[str, Path], tmp_path: Path) -> None:
    folder = moe_models["mixtral"]
    with pytest.raises(ValidationError, match="MoE router"):
        init_adapter(folder, InitOptions(out=tmp_path / "r", targets="re:block_sparse_moe.gate$"))
    with pytest.raises(ValidationError, match="calibration"):
        init_adapter(folder, InitOptions(out=tmp_path / "e", method="eva", targets="expert"))


def _peft_stack_ranks(folder: Path, config: object) -> dict[str, int]:
    """Rank of every adapted module / parameter once PEFT applied `config` to the real model."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    wrapped = peft.get_peft_model(model, config)
    out = {}
    for name, mod in wrapped.named_modules():
        if type(mod).__name__ == "ParamWrapper":
            path = name.replace(".base_layer", "")
            out[path.removeprefix("base_model.model.") + "." + mod.parameter_name] = mod.r[
                "default"
            ]
        elif type(mod).__name__ == "Linear" and hasattr(mod, "lora_A"):
            out[name.removeprefix("base_model.model.")] = mod.r["default"]
    return out


def test_plan_for_peft_gives_the_ranks_init_writes(
    moe_models: dict[str, Path], tmp_path: Path
) -> None:
    from spectra.jobs.plan import PlanOptions, make_plan

    folder = moe_models["qwen2_moe"]
    common = dict(targets="q,expert", allocator="energy", budget=48, min_rank=1, max_rank=8)
    init = init_adapter(folder, InitOptions(out=tmp_path / "init", **common))
    plan = make_plan(folder, PlanOptions(kind="peft", out=tmp_path / "plan", **common), cache=False)
    config = plan.plan["lora_config"]
    assert config["target_parameters"] == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("down_proj", "gate_up_proj")
    )
    mine = _peft_stack_ranks(folder, peft.LoraConfig.from_pretrained(plan.out))
    theirs = _peft_stack_ranks(folder, peft.LoraConfig.from_pretrained(init.adapter_dir))
    assert mine == theirs
    assert len(mine) == 2 + 4 and len(set(mine.values())) > 1
    assert {m["key"]: m["rank"] for m in plan.plan["modules"]} == {
        m.key: m.rank for m in init.plan.modules
    }


def test_spectra_readers_refuse_a_target_parameters_adapter_in_one_line(
    moe_models: dict[str, Path], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from spectra.cli.main import app

    folder = moe_models["mixtral"]
    result = init_adapter(folder, InitOptions(out=tmp_path / "i", targets="expert", rank=2))
    for args in (
        ["compare", str(folder), str(result.adapter_dir), "--out", str(tmp_path / "c")],
        [
            "convert",
            "--init",
            str(result.out),
            "--trained",
            str(result.adapter_dir),
            "--out",
            str(tmp_path / "v"),
        ],
    ):
        run = CliRunner().invoke(app, args)
        assert run.exit_code == 2, run.output
        line = " ".join(run.output.split())
        assert "targets 3-D parameters" in line and "merge_and_unload" in line
