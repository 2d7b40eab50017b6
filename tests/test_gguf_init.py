"""`init` on a GGUF model: the PEFT adapter targets the Hugging Face module paths, PEFT resolves
them on a transformers LlamaForCausalLM built from the GGUF's config, and residual base + adapter
compute what the dequantized GGUF model computes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _gguf_fixtures import llama_weights, tiny_llama_gguf

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import PeftModel  # noqa: E402

from spectra.jobs.init import InitOptions, init_adapter  # noqa: E402
from spectra.sources.checkpoint import Checkpoint  # noqa: E402

SIZES = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 96, "vocab": 128}
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")


def test_init_adapter_on_gguf_loads_in_peft_on_transformers_llama(tmp_path: Path) -> None:
    path = tiny_llama_gguf(
        tmp_path / "tiny.gguf", llama_weights(**SIZES, seed=2), heads=4, kv_heads=2
    )  # Q8_0
    targets = ",".join(f"model.layers.{i}.{m}" for i in range(2) for m in MODULES)
    res = init_adapter(
        str(path),
        InitOptions(
            out=tmp_path / "out",
            method="pissa",
            rank=4,
            targets=targets,
            device="cpu",
            residual_dtype="float32",
        ),
    )
    config = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(targets.split(","))
    assert res.residual_dir is not None
    with Checkpoint.open(path) as ckpt:
        llama_config = transformers.LlamaConfig(**ckpt.config)
        state = {m.key: ckpt.read(m) for m in ckpt.matrices()}
        state.update({t.name: ckpt.read(t) for t in ckpt.tensors()})
    dequantized = transformers.LlamaForCausalLM(llama_config).eval()
    missing, unexpected = dequantized.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    residual = transformers.LlamaForCausalLM.from_pretrained(res.residual_dir).eval()
    model = PeftModel.from_pretrained(residual, res.adapter_dir).eval()
    for i in range(2):
        for m in MODULES:
            layer = model.base_model.model.model.layers[i]
            module = layer.get_submodule(m)
            assert module.lora_A["default"].weight.shape[0] == 4, (i, m)  # resolved by PEFT
    ids = torch.randint(0, SIZES["vocab"], (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, ref = model(ids).logits, dequantized(ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
