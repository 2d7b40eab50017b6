"""Synthetic checkpoints for tests: tiny, seeded, written with the reference safetensors writer.

Every builder writes into `folder` (created if needed) and returns the path to open with
`Checkpoint.open`. Tensor values are seeded normal draws (scaled by 0.02), so two calls with the
same arguments write byte-identical files. Other test modules import these; keep them stable.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)


def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write one safetensors file (contiguous copies; `format: pt` metadata by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(metadata) if metadata is not None else {"format": "pt"}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def write_sharded(
    folder: Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    shards: int = 2,
    index: bool = True,
    config: Mapping[str, object] | None = None,
) -> Path:
    """Split `tensors` (in order) into `shards` files `model-0000i-of-0000n.safetensors`.

    With `index`, writes `model.safetensors.index.json`; with one shard and no index the file is
    `model.safetensors`. Returns `folder`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per = math.ceil(len(names) / shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        if shards == 1 and not index:
            fname = "model.safetensors"
        else:
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(folder / fname, {n: tensors[n] for n in part})
        for n in part:
            weight_map[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    if index:
        body = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(body, indent=1))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(dict(config)))
    return folder


def llama_tensors(
    *,
    layers: int = 2,
    hidden: int = 64,
    intermediate: int = 128,
    vocab: int = 100,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Llama/Mistral-style tensors: embed_tokens, q/k/v/o, gate/up/down, norms, lm_head."""
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": _randn(g, vocab, hidden, dtype=dtype)
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{proj}.weight"] = _randn(g, hidden, hidden, dtype=dtype)
        t[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        t[p + "mlp.gate_proj.weight"] = _randn(g, intermediate, hidden, dtype=dtype)
        t[p + "mlp.up_proj.weight"] = _randn(g, intermediate, hidden, dtype=dtype)
        t[p + "mlp.down_proj.weight"] = _randn(g, hidden, intermediate, dtype=dtype)
    t["model.norm.weight"] = torch.ones(hidden, dtype=dtype)
    t["lm_head.weight"] = _randn(g, vocab, hidden, dtype=dtype)
    return t


def write_llama_like(
    folder: Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    intermediate: int = 128,
    vocab: int = 100,
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 2,
    index: bool = True,
    seed: int = 0,
) -> Path:
    """A sharded Llama-like checkpoint folder (with config.json). Returns `folder`."""
    tensors = llama_tensors(
        layers=layers, hidden=hidden, intermediate=intermediate, vocab=vocab, dtype=dtype, seed=seed
    )
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
    }
    return write_sharded(folder, tensors, shards=shards, index=index, config=config)


def write_gpt2_like(
    folder: Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    vocab: int = 100,
    positions: int = 32,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Path:
    """GPT-2 layout: `h.N.attn.c_attn` etc. stored as Conv1D (in, out). One file; returns it."""
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {
        "wte.weight": _randn(g, vocab, hidden, dtype=dtype),
        "wpe.weight": _randn(g, positions, hidden, dtype=dtype),
    }
    for i in range(layers):
        p = f"h.{i}."
        t[p + "ln_1.weight"] = torch.ones(hidden, dtype=dtype)
        t[p + "ln_1.bias"] = torch.zeros(hidden, dtype=dtype)
        t[p + "attn.c_attn.weight"] = _randn(g, hidden, 3 * hidden, dtype=dtype)
        t[p + "attn.c_attn.bias"] = torch.zeros(3 * hidden, dtype=dtype)
        t[p + "attn.c_proj.weight"] = _randn(g, hidden, hidden, dtype=dtype)
        t[p + "mlp.c_fc.weight"] = _randn(g, hidden, 4 * hidden, dtype=dtype)
        t[p + "mlp.c_proj.weight"] = _randn(g, 4 * hidden, hidden, dtype=dtype)
    t["ln_f.weight"] = torch.ones(hidden, dtype=dtype)
    return write_safetensors(folder / "model.safetensors", t)


def write_mixtral_like(
    folder: Path,
    *,
    layers: int = 1,
    hidden: int = 32,
    intermediate: int = 48,
    experts: int = 4,
    vocab: int = 50,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """Mixtral layout: router `block_sparse_moe.gate` and `experts.E.w1/w2/w3`. Returns `folder`."""
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": _randn(g, vocab, hidden, dtype=dtype)
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{proj}.weight"] = _randn(g, hidden, hidden, dtype=dtype)
        t[p + "block_sparse_moe.gate.weight"] = _randn(g, experts, hidden, dtype=dtype)
        for e in range(experts):
            q = p + f"block_sparse_moe.experts.{e}."
            t[q + "w1.weight"] = _randn(g, intermediate, hidden, dtype=dtype)
            t[q + "w2.weight"] = _randn(g, hidden, intermediate, dtype=dtype)
            t[q + "w3.weight"] = _randn(g, intermediate, hidden, dtype=dtype)
    t["lm_head.weight"] = _randn(g, vocab, hidden, dtype=dtype)
    config = {"model_type": "mixtral", "hidden_size": hidden, "num_local_experts": experts}
    return write_sharded(folder, t, shards=1, index=False, config=config)


def write_stacked_experts(
    folder: Path,
    *,
    layers: int = 1,
    hidden: int = 32,
    intermediate: int = 48,
    experts: int = 4,
    dtype: torch.dtype = torch.bfloat16,
    transposed: bool = False,
    config: bool = True,
    seed: int = 0,
) -> Path:
    """3-D expert stacks `mlp.experts.gate_up_proj` (E, 2*I, H) and `mlp.experts.down_proj`
    (E, H, I), the transformers layout; `transposed=True` stores (E, H, 2*I) and (E, I, H) as
    gpt-oss/Llama-4 do (then `config=True` is what lets the reader present them (out, in)).
    Returns `folder`."""
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}
    for i in range(layers):
        p = f"model.layers.{i}.mlp."
        gate_up = _randn(g, experts, 2 * intermediate, hidden, dtype=dtype)
        down = _randn(g, experts, hidden, intermediate, dtype=dtype)
        if transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        t[p + "gate.weight"] = _randn(g, experts, hidden, dtype=dtype)
        t[p + "experts.gate_up_proj"] = gate_up
        t[p + "experts.down_proj"] = down
    cfg = {"model_type": "qwen3_moe", "hidden_size": hidden} if config else None
    return write_sharded(folder, t, shards=1, index=False, config=cfg)


def _pattern_value(patterns: Mapping[str, int | float], module: str, default: int | float) -> float:
    """PEFT's rule: the first pattern key that matches the end of the module path, as a regex."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def write_lora_adapter(
    folder: Path,
    base_shapes: Mapping[str, tuple[int, int]],
    *,
    r: int = 4,
    alpha: float = 8,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    use_rslora: bool = False,
    adapter_name: str | None = None,
    base_model: str = "base",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Path:
    """A PEFT LoRA adapter folder for the base weights `base_shapes` ({"x.weight": (out, in)}).

    Writes `adapter_config.json` and `adapter_model.safetensors` with keys
    `base_model.model.<module>.lora_A[.<adapter_name>].weight` (A: (r, in), B: (out, r)), ranks and
    alphas from the patterns as PEFT resolves them. B is nonzero so dW = s * B @ A is too.
    Returns `folder`.
    """
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    mid = f".{adapter_name}" if adapter_name else ""
    modules = []
    for key, (out_dim, in_dim) in base_shapes.items():
        module = key.removesuffix(".weight")
        modules.append(module.rsplit(".", 1)[-1])
        rank = int(_pattern_value(rank_pattern or {}, module, r))
        tensors[f"base_model.model.{module}.lora_A{mid}.weight"] = _randn(
            g, rank, in_dim, dtype=dtype
        )
        tensors[f"base_model.model.{module}.lora_B{mid}.weight"] = _randn(
            g, out_dim, rank, dtype=dtype
        )
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": dict(alpha_pattern or {}),
        "target_modules": sorted(set(modules)),
        "task_type": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return folder
