"""LoRA adapters: PEFT key naming, rank/alpha patterns, rsLoRA, and the adapter on its base."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _source_fixtures import write_llama_like, write_lora_adapter
from safetensors.torch import load_file

from spectra.errors import SourceError
from spectra.formats.peft import pattern_value
from spectra.sources.adapters import LoraAdapter, MergedCheckpoint
from spectra.sources.checkpoint import Checkpoint

Q0 = "model.layers.0.self_attn.q_proj.weight"
V0 = "model.layers.0.self_attn.v_proj.weight"
D1 = "model.layers.1.mlp.down_proj.weight"
SHAPES = {Q0: (64, 64), V0: (64, 64), D1: (64, 128)}


def test_pattern_value_matches_like_peft() -> None:
    pats = {"q_proj": 8, r"layers\.1\..*down_proj": 2}
    assert pattern_value(pats, "model.layers.0.self_attn.q_proj", 4) == 8
    assert pattern_value(pats, "model.layers.1.mlp.down_proj", 4) == 2
    assert pattern_value(pats, "model.layers.0.mlp.down_proj", 4) == 4
    assert pattern_value(pats, "model.layers.0.self_attn.xq_proj", 4) == 4  # whole component


@pytest.mark.parametrize("adapter_name", [None, "default"])
def test_factors_ranks_and_scales(tmp_path: Path, adapter_name: str | None) -> None:
    folder = write_lora_adapter(
        tmp_path / "ad",
        SHAPES,
        r=4,
        alpha=8,
        rank_pattern={"q_proj": 6},
        alpha_pattern={"down_proj": 3},
        adapter_name=adapter_name,
    )
    raw = load_file(str(folder / "adapter_model.safetensors"))
    mid = f".{adapter_name}" if adapter_name else ""
    with LoraAdapter.open(folder) as ad:
        assert set(ad.modules) == {k.removesuffix(".weight") for k in SHAPES}
        q = ad.modules["model.layers.0.self_attn.q_proj"]
        assert (q.base_key, q.rank, q.alpha, q.scale) == (Q0, 6, 8.0, 8 / 6)
        d = ad.by_base_key()[D1]
        assert (d.rank, d.alpha, d.scale) == (4, 3.0, 0.75)
        A, B, s = ad.read_factors(Q0)
        assert A.shape == (6, 64) and B.shape == (64, 6) and s == 8 / 6
        key = f"base_model.model.model.layers.0.self_attn.q_proj.lora_A{mid}.weight"
        assert torch.equal(A, raw[key])
        dW = ad.delta(D1, dtype=torch.float64)
        a64 = raw[f"base_model.model.model.layers.1.mlp.down_proj.lora_A{mid}.weight"].double()
        b64 = raw[f"base_model.model.model.layers.1.mlp.down_proj.lora_B{mid}.weight"].double()
        assert torch.allclose(dW, 0.75 * b64 @ a64, rtol=0, atol=1e-15)


def test_rslora_scale(tmp_path: Path) -> None:
    folder = write_lora_adapter(tmp_path / "ad", SHAPES, r=16, alpha=8, use_rslora=True)
    ad = LoraAdapter.open(folder)
    assert all(m.scale == 8 / math.sqrt(16) and m.use_rslora for m in ad.modules.values())


def test_real_peft_adapter(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = torch.nn.Linear(12, 10)
            self.value = torch.nn.Linear(12, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.query(x) + self.value(x)

    torch.manual_seed(0)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["query", "value"],
        rank_pattern={"value": 2},
        init_lora_weights=False,
    )
    model = peft.get_peft_model(Tiny(), cfg)
    model.save_pretrained(str(tmp_path / "ad"))
    with LoraAdapter.open(tmp_path / "ad") as ad:
        assert {m.rank for m in ad.modules.values()} == {4, 2}
        for name in ("query", "value"):
            layer = getattr(model.base_model.model, name)
            want = layer.get_delta_weight("default")
            got = ad.delta(f"{name}.weight")
            assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), name


def test_merged_checkpoint_reads_w_plus_delta(tmp_path: Path) -> None:
    base = Checkpoint.open(write_llama_like(tmp_path / "base", dtype=torch.float32))
    ad = LoraAdapter.open(write_lora_adapter(tmp_path / "ad", SHAPES, r=4, alpha=8))
    merged = MergedCheckpoint(base, ad)
    q = next(m for m in merged.matrices() if m.key == Q0)
    k = next(m for m in merged.matrices() if m.key.endswith("layers.0.self_attn.k_proj.weight"))
    w = base.read(q, dtype=torch.float64)
    assert torch.allclose(
        merged.read(q, dtype=torch.float64), w + ad.delta(Q0, dtype=torch.float64)
    )
    assert torch.equal(merged.read(k), base.read(k))
    got = dict(merged.read_many([q, k]))
    assert torch.allclose(got[q], merged.read(q)) and torch.equal(got[k], base.read(k))
    assert merged.content_key(q) != base.content_key(q)
    assert merged.content_key(k) == base.content_key(k)


def test_adapter_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no adapter_config.json"):
        LoraAdapter.open(tmp_path)
    folder = write_lora_adapter(tmp_path / "ad", {"other.layer.weight": (8, 8)})
    base = Checkpoint.open(write_llama_like(tmp_path / "base"))
    with pytest.raises(SourceError, match=r"adapter module 'other.layer' has no base"):
        MergedCheckpoint(base, LoraAdapter.open(folder))
    wrong = write_lora_adapter(tmp_path / "ad2", {Q0: (32, 64)})
    with pytest.raises(SourceError, match=r"wrong base model"):
        MergedCheckpoint(base, LoraAdapter.open(wrong))
