"""Tiny mixture-of-experts checkpoints: a Mixtral layout with planted expert similarity, and
real transformers MoE models (Mixtral, Qwen2-MoE, gpt-oss) saved by `save_pretrained`."""

from __future__ import annotations

from pathlib import Path

import torch
from _source_fixtures import write_sharded

HIDDEN = 32
INTERMEDIATE = 48


def planted_experts(seed: int = 0) -> dict[str, torch.Tensor]:
    """Layer 0 of a Mixtral layout with 4 experts, float32: expert 1 a copy of expert 0 whose
    hidden units are permuted (rows of w1/w3, columns of w2: the same function), expert 2 expert
    0 plus 1e-3 relative noise, expert 3 independent. Layer 1: 3 independent experts."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": randn(50, HIDDEN)}
    for layer, count in ((0, 4), (1, 3)):
        p = f"model.layers.{layer}."
        t[p + "self_attn.q_proj.weight"] = randn(HIDDEN, HIDDEN)
        t[p + "block_sparse_moe.gate.weight"] = randn(count, HIDDEN)
        experts = [
            {"w1": randn(INTERMEDIATE, HIDDEN), "w2": randn(HIDDEN, INTERMEDIATE)}
            for _ in range(count)
        ]
        for ex in experts:
            ex["w3"] = randn(INTERMEDIATE, HIDDEN)
        if layer == 0:
            perm = torch.randperm(INTERMEDIATE, generator=g)
            base = experts[0]
            experts[1] = {"w1": base["w1"][perm], "w3": base["w3"][perm], "w2": base["w2"][:, perm]}
            experts[2] = {
                k: v + 1e-3 * v.std() * torch.randn(v.shape, generator=g) for k, v in base.items()
            }
        for e, ex in enumerate(experts):
            for name in ("w1", "w2", "w3"):
                key = f"{p}block_sparse_moe.experts.{e}.{name}.weight"
                t[key] = ex[name].contiguous()
    t["lm_head.weight"] = randn(50, HIDDEN)
    return t


def write_planted_experts(folder: Path) -> Path:
    config = {"model_type": "mixtral", "hidden_size": HIDDEN, "num_local_experts": 4}
    return write_sharded(folder, planted_experts(), shards=1, index=False, config=config)


def write_transformers_moe(folder: Path, kind: str, *, seed: int = 0) -> Path:
    """A tiny random `kind` ("mixtral", "qwen2_moe", "gpt_oss") model saved with transformers'
    save_pretrained (its own checkpoint layout: per-expert w1/w2/w3 for Mixtral, per-expert
    gate/up/down plus a shared expert for Qwen2-MoE, fused 3-D stacks for gpt-oss), float32."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
    )
    if kind == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4, **common))
    elif kind == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(
            num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=36, **common
        )
        model = tf.Qwen2MoeForCausalLM(cfg)
    elif kind == "gpt_oss":
        cfg = tf.GptOssConfig(num_local_experts=4, head_dim=8, **common)
        model = tf.GptOssForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    return folder
