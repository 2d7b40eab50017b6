"""Roles, layers and layouts from tensor names: dense, GPT-2 Conv1D, MoE experts, 3-D stacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _source_fixtures import (
    write_gpt2_like,
    write_mixtral_like,
    write_safetensors,
    write_stacked_experts,
)
from safetensors.torch import load_file

from spectra.formats.safetensors import TensorRef
from spectra.sources.checkpoint import Checkpoint
from spectra.sources.roles import classify, expert_slot, layer_index, name_role


@pytest.mark.parametrize(
    ("stem", "role"),
    [
        ("model.layers.0.self_attn.q_proj", "q"),
        ("model.layers.0.self_attn.k_proj", "k"),
        ("model.layers.0.self_attn.v_proj", "v"),
        ("model.layers.0.self_attn.o_proj", "o"),
        ("model.layers.0.self_attn.qkv_proj", "qkv"),
        ("model.layers.0.mlp.gate_up_proj", "gate_up"),
        ("model.layers.0.mlp.gate_proj", "gate"),
        ("model.layers.0.mlp.up_proj", "up"),
        ("model.layers.0.mlp.down_proj", "down"),
        ("layers.0.attention.wq", "q"),
        ("layers.0.attention.wo", "o"),
        ("layers.0.feed_forward.w1", "gate"),
        ("layers.0.feed_forward.w3", "up"),
        ("layers.0.feed_forward.w2", "down"),
        ("h.0.attn.c_attn", "qkv"),
        ("h.0.attn.c_proj", "o"),
        ("h.0.mlp.c_fc", "up"),
        ("h.0.mlp.c_proj", "down"),
        ("gpt_neox.layers.0.attention.query_key_value", "qkv"),
        ("gpt_neox.layers.0.attention.dense", "o"),
        ("encoder.layer.0.attention.self.query", "q"),
        ("encoder.layer.0.attention.output.dense", "o"),
        ("encoder.layer.0.intermediate.dense", "up"),
        ("encoder.layer.0.output.dense", "down"),
        ("model.embed_tokens", "embedding"),
        ("transformer.wte", "embedding"),
        ("embeddings.word_embeddings", "embedding"),
        ("lm_head", "lm_head"),
        ("pooler.dense", "other"),
        # MoE routers are no gate_proj (Mixtral, Qwen/DeepSeek/OLMoE, gpt-oss, DBRX/JetMoE)
        ("model.layers.0.block_sparse_moe.gate", "router"),
        ("model.layers.0.mlp.gate", "router"),
        ("model.layers.0.mlp.router", "router"),
        ("transformer.blocks.0.ffn.router.layer", "router"),
        ("model.layers.0.mlp.shared_expert_gate", "router"),
        ("model.layers.0.mlp.gate_proj", "gate"),
        ("model.layers.0.mlp.experts.gate_up_proj", "gate_up"),
    ],
)
def test_name_roles(stem: str, role: str) -> None:
    assert name_role(stem) == role


def test_layer_index() -> None:
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("encoder.layer.3.output.dense.weight") == 3
    assert layer_index("transformer.h.7.attn.c_attn.weight") == 7
    assert layer_index("lm_head.weight") is None


@pytest.mark.parametrize(
    ("name", "shape", "dtype"),
    [
        ("model.norm.weight", (64,), "BF16"),
        ("model.layers.0.self_attn.q_proj.bias", (64, 2), "F32"),  # biases are never matrices
        ("model.layers.0.input_layernorm.weight", (4, 64), "F32"),
        ("embeddings.position_ids", (1, 512), "I64"),
        ("model.layers.0.self_attn.q_proj.weight_scale_inv", (4, 4), "F32"),
        ("model.layers.0.self_attn.q_proj.weight", (0, 64), "F32"),
        ("conv.weight", (8, 3, 3, 3), "F32"),
        ("some.buffer", (8, 8, 8), "F32"),
    ],
)
def test_not_matrices(name: str, shape: tuple[int, ...], dtype: str) -> None:
    ref = TensorRef(name, shape, dtype, Path("x.safetensors"), 0, 0)
    assert classify(ref) == []


def test_gpt2_conv1d_presented_out_in(tmp_path: Path) -> None:
    path = write_gpt2_like(tmp_path / "g", hidden=32)
    ref = load_file(str(path))
    with Checkpoint.open(path) as ckpt:
        mats = {m.tensor.name: m for m in ckpt.matrices()}
        c_attn = mats["h.1.attn.c_attn.weight"]
        assert (c_attn.role, c_attn.layer, c_attn.shape, c_attn.transpose) == (
            "qkv",
            1,
            (96, 32),
            True,
        )
        assert mats["h.0.mlp.c_fc.weight"].shape == (128, 32)
        assert mats["h.0.mlp.c_proj.weight"].shape == (32, 128)
        assert mats["h.0.mlp.c_proj.weight"].role == "down"
        assert mats["h.0.attn.c_proj.weight"].role == "o"
        assert mats["wte.weight"].role == "embedding" and not mats["wte.weight"].transpose
        W = ckpt.read(c_attn)
        assert W.shape == (96, 32) and W.is_contiguous()
        assert torch.equal(W, ref["h.1.attn.c_attn.weight"].T)
        raw = ckpt.read(c_attn.tensor)  # the TensorRef reads as stored
        assert torch.equal(raw, ref["h.1.attn.c_attn.weight"])
        assert not any(".bias" in n or "ln_" in n for n in mats)
        square = mats["h.0.attn.c_proj.weight"]
        assert ckpt.content_key(square).endswith(":T")


def test_mixtral_experts(tmp_path: Path) -> None:
    folder = write_mixtral_like(tmp_path / "mx", experts=3, hidden=16, intermediate=24)
    with Checkpoint.open(folder) as ckpt:
        experts = [m for m in ckpt.matrices() if m.role == "expert"]
        assert len(experts) == 9
        by = {(m.expert, m.expert_role): m for m in experts}
        assert by[(2, "gate")].tensor.name.endswith("experts.2.w1.weight")
        assert by[(0, "down")].shape == (16, 24) and by[(0, "up")].shape == (24, 16)
        assert {m.layer for m in experts} == {0}
        router = ckpt.matrices(include=["*block_sparse_moe.gate.weight"])
        assert [(m.role, m.expert, m.shape) for m in router] == [("router", None, (3, 16))]
        assert [m.key for m in ckpt.matrices(roles=["router"])] == [router[0].key]
        downs = ckpt.matrices(roles=["down"])
        assert {m.expert for m in downs} == {0, 1, 2}


def test_qwen_moe_expert_names() -> None:
    ref = TensorRef(
        "model.layers.4.mlp.experts.17.gate_proj.weight", (8, 4), "BF16", Path("x"), 0, 64
    )
    (m,) = classify(ref)
    assert (m.role, m.expert, m.expert_role, m.layer) == ("expert", 17, "gate", 4)
    shared = TensorRef(
        "model.layers.4.mlp.shared_expert.up_proj.weight", (8, 4), "BF16", Path("x"), 0, 64
    )
    (s,) = classify(shared)
    assert (s.role, s.expert, s.expert_role, s.layer) == ("shared_expert", None, "up", 4)
    deepseek = TensorRef(
        "model.layers.3.mlp.shared_experts.down_proj.weight", (4, 8), "BF16", Path("x"), 0, 64
    )
    (d,) = classify(deepseek)
    assert (d.role, d.expert, d.expert_role) == ("shared_expert", None, "down")
    gate = TensorRef("model.layers.3.mlp.gate.weight", (64, 8), "BF16", Path("x"), 0, 1024)
    assert classify(gate)[0].role == "router"
    name = "model.layers.3.mlp.shared_expert_gate.weight"
    scalar = TensorRef(name, (1, 8), "F32", Path("x"), 0, 32)
    assert (classify(scalar)[0].role, classify(scalar)[0].expert) == ("router", None)


@pytest.mark.parametrize(
    ("key", "slot"),
    [
        ("model.layers.0.block_sparse_moe.experts.3.w1.weight", (3, "gate")),
        ("model.layers.0.block_sparse_moe.experts.3.w3.weight", (3, "up")),
        ("model.layers.0.block_sparse_moe.experts.12.w2.weight", (12, "down")),
        ("model.layers.1.mlp.experts.gate_up_proj[expert=5]", (5, "gate_up")),
        ("model.layers.1.mlp.experts.down_proj[expert=0]", (0, "down")),
        ("model.layers.1.mlp.shared_expert.gate_proj.weight", (None, "gate")),
        ("model.layers.1.mlp.shared_experts.up_proj.weight", (None, "up")),
        ("model.layers.1.mlp.gate.weight", (None, None)),
        ("model.layers.1.mlp.down_proj.weight", (None, None)),
    ],
)
def test_expert_slot_matches_classify(key: str, slot: tuple) -> None:
    assert expert_slot(key) == slot
    if "[" not in key:
        (m,) = classify(TensorRef(key, (8, 4), "F32", Path("x"), 0, 128))
        assert (m.expert, m.expert_role) == slot


@pytest.mark.parametrize("transposed", [False, True])
def test_stacked_experts_split_per_expert(tmp_path: Path, transposed: bool) -> None:
    folder = write_stacked_experts(
        tmp_path / "s", experts=3, hidden=16, intermediate=12, transposed=transposed
    )
    ref = load_file(str(folder / "model.safetensors"))
    with Checkpoint.open(folder) as ckpt:
        mats = [m for m in ckpt.matrices() if m.role == "expert"]
        assert len(mats) == 6
        gate_up = {m.expert: m for m in mats if m.expert_role == "gate_up"}
        down = {m.expert: m for m in mats if m.expert_role == "down"}
        assert gate_up[1].key == "model.layers.0.mlp.experts.gate_up_proj[expert=1]"
        assert gate_up[0].shape == (24, 16) and down[0].shape == (16, 12)
        assert gate_up[0].transpose is transposed and down[2].transpose is transposed
        for e in range(3):
            stored_gu = ref["model.layers.0.mlp.experts.gate_up_proj"][e]
            stored_dn = ref["model.layers.0.mlp.experts.down_proj"][e]
            want_gu = stored_gu.T if transposed else stored_gu
            want_dn = stored_dn.T if transposed else stored_dn
            assert torch.equal(ckpt.read(gate_up[e]), want_gu.float())
            assert torch.equal(
                ckpt.read(f"model.layers.0.mlp.experts.down_proj[expert={e}]"), want_dn.float()
            )
        got = dict(ckpt.read_many(mats))
        stored = ref["model.layers.0.mlp.experts.down_proj"][1]
        assert torch.equal(got[down[1]], (stored.T if transposed else stored).float())
        keys = {ckpt.content_key(m) for m in mats}
        assert len(keys) == 6


def test_stacked_without_config_reads_as_stored(tmp_path: Path) -> None:
    folder = write_stacked_experts(tmp_path / "s", hidden=16, intermediate=8, config=False)
    with Checkpoint.open(folder) as ckpt:
        m = ckpt.matrices(include=["*down_proj*"])[0]
        assert m.shape == (16, 8) and not m.transpose


def test_fused_and_lm_head(tmp_path: Path) -> None:
    t = {
        "model.layers.0.self_attn.qkv_proj.weight": torch.zeros(48, 16),
        "model.layers.0.mlp.gate_up_proj.weight": torch.zeros(64, 16),
        "lm_head.weight": torch.zeros(10, 16),
    }
    with Checkpoint.open(write_safetensors(tmp_path / "f.safetensors", t)) as ckpt:
        roles = {m.tensor.name: (m.role, m.shape) for m in ckpt.matrices()}
    assert roles == {
        "model.layers.0.self_attn.qkv_proj.weight": ("qkv", (48, 16)),
        "model.layers.0.mlp.gate_up_proj.weight": ("gate_up", (64, 16)),
        "lm_head.weight": ("lm_head", (10, 16)),
    }
