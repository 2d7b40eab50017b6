"""Synthetic base/fine-tune pairs with planted answers, shared by the compare tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

D = 48  # hidden size of the synthetic model
Q0, V0, Q1, V1 = (f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "qv")
DOWN0 = "model.layers.0.mlp.down_proj.weight"


def orth(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def base_and_ft() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Base weights and a fine-tune with planted answers (all float64 before storage)."""
    g = torch.Generator().manual_seed(0)
    s = torch.linspace(2.0, 0.2, D, dtype=torch.float64)
    base, ft, planted = {}, {}, {}
    for key in (Q0, V0, Q1, V1):
        u, v = orth(D, g), orth(D, g)
        base[key] = u @ torch.diag(s) @ v.T
        planted[key] = (u, v)
    base[DOWN0] = torch.randn(D, 2 * D, generator=g, dtype=torch.float64) * 0.1
    # Q0: rank-1 update along a direction orthogonal to the base's top-10 subspace, larger than
    # the base's S_1 = 2: exactly one intruder.
    u, v = planted[Q0]
    u_dir = u[:, 10:].sum(1) / math.sqrt(D - 10)
    v_dir = v[:, 10:].sum(1) / math.sqrt(D - 10)
    ft[Q0] = base[Q0] + 3.0 * torch.outer(u_dir, v_dir)
    # V0: small dense update (full fine-tuning-like): full rank, no intruders.
    ft[V0] = base[V0] + 1e-3 * torch.randn(D, D, generator=g, dtype=torch.float64)
    # Q1: exact rank-3 update of moderate size.
    ft[Q1] = base[Q1] + 0.01 * torch.randn(D, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, D, generator=g, dtype=torch.float64
    )
    ft[V1] = base[V1].clone()  # did not move
    ft[DOWN0] = base[DOWN0].clone()
    return base, ft, planted


def save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float32).contiguous() for k, v in tensors.items()}, path / "m.st")
    (path / "m.st").rename(path / "model.safetensors")
    return path


def lora_and_merged(root: Path) -> tuple[Path, Path, Path]:
    g = torch.Generator().manual_seed(5)
    base, _, _ = base_and_ft()
    r, alpha = 4, 8.0
    scale = alpha / r
    adapter, merged = {}, {k: v.clone() for k, v in base.items()}
    for key in (Q0, V1):
        mod = key.removesuffix(".weight")
        a = (torch.randn(r, D, generator=g) * 0.3).to(torch.float32)
        b = (torch.randn(D, r, generator=g) * 0.3).to(torch.float32)
        adapter[f"base_model.model.{mod}.lora_A.weight"] = a
        adapter[f"base_model.model.{mod}.lora_B.weight"] = b
        merged[key] = base[key].float().double() + scale * (b.double() @ a.double())
    ad = root / "adapter"
    ad.mkdir()
    save_file(adapter, str(ad / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj"]}
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    return save(root / "base", base), ad, save(root / "merged", merged)
