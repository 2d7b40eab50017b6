"""report, compare and init on quantized checkpoints: the quantization is shown, a quantized
model pairs with its full-precision base by logical weight name, and init writes a dequantized
residual base that loads as a plain model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from _quant_fixtures import gptq_tensors, write_checkpoint
from safetensors.torch import load_file

from spectra.export.decoded import DequantizedBaseWarning
from spectra.jobs.init import InitOptions, init_adapter

P = "model.layers.0.self_attn"


def _quantized_llama(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A one-layer Llama-like GPTQ checkpoint: q_proj 4-bit, k_proj bf16, a norm, a bias."""
    g = torch.Generator().manual_seed(5)
    Wq = torch.randn(64, 128, generator=g) * 0.05
    parts, deq = gptq_tensors(Wq, 4, 32)
    tensors = {f"{P}.q_proj.{k}": v for k, v in parts.items()}
    Wk = (torch.randn(32, 128, generator=g) * 0.05).to(torch.bfloat16)
    tensors[f"{P}.k_proj.weight"] = Wk
    tensors["model.layers.0.input_layernorm.weight"] = torch.ones(128, dtype=torch.bfloat16)
    write_checkpoint(folder, tensors, {"quant_method": "gptq", "bits": 4, "group_size": 32})
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=128, torch_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(config))
    return folder, {"q": deq, "k": Wk.to(torch.float32)}


@pytest.mark.parametrize("residual_dtype", ["float32", "source"])
def test_init_on_quantized_base_writes_dequantized_residual(
    tmp_path: Path, residual_dtype: str
) -> None:
    folder, W = _quantized_llama(tmp_path / "gptq")
    opts = InitOptions(
        out=tmp_path / "out",
        method="pissa",
        rank=4,
        targets="q,k",
        svd="exact",
        device="cpu",
        residual_dtype=residual_dtype,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = init_adapter(folder, opts)
    notes = [str(w.message) for w in caught if w.category is DequantizedBaseWarning]
    assert len(notes) == 1 and "gptq 4-bit group 32" in notes[0] and "1 quantized" in notes[0]
    base = result.residual_dir
    assert base is not None
    stored = load_file(str(base / "model.safetensors"))
    want = torch.float32 if residual_dtype == "float32" else torch.bfloat16
    assert sorted(stored) == sorted(
        [f"{P}.q_proj.weight", f"{P}.k_proj.weight", "model.layers.0.input_layernorm.weight"]
    )
    assert stored[f"{P}.q_proj.weight"].dtype == want and stored[f"{P}.q_proj.weight"].shape == (
        64,
        128,
    )
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    A = adapter[f"base_model.model.{P}.q_proj.lora_A.weight"].double()
    B = adapter[f"base_model.model.{P}.q_proj.lora_B.weight"].double()
    rebuilt = stored[f"{P}.q_proj.weight"].double() + B @ A  # alpha = r: scale 1
    tol = 1e-6 if residual_dtype == "float32" else 4e-3
    err = (rebuilt - W["q"].double()).norm() / W["q"].double().norm()
    assert err < tol
    config = json.loads((base / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["torch_dtype"] == ("float32" if residual_dtype == "float32" else "bfloat16")
    # what loads it: the residual base is a plain checkpoint now
    from spectra.sources.checkpoint import Checkpoint

    with Checkpoint.open(base) as ckpt:
        assert ckpt.quantization.method is None
        assert [m.key for m in ckpt.matrices()] == [f"{P}.q_proj.weight", f"{P}.k_proj.weight"]


def test_compare_quantized_with_its_base_pairs_by_weight_name(tmp_path: Path) -> None:
    """What quantization did, layer by layer: dW = dequant(Q(W)) - W, paired by `X.weight`."""
    from spectra.analysis.comparison import CompareOptions
    from spectra.jobs.compare import compare

    folder, W = _quantized_llama(tmp_path / "gptq")
    g = torch.Generator().manual_seed(5)
    Wq = torch.randn(64, 128, generator=g) * 0.05  # the same draw as _quantized_llama
    base = tmp_path / "base"
    write_checkpoint(
        base,
        {
            f"{P}.q_proj.weight": Wq,
            f"{P}.k_proj.weight": W["k"],
            "model.layers.0.input_layernorm.weight": torch.ones(128),
        },
        None,
    )
    result = compare(base, folder, CompareOptions(device="cpu"), cache=None)
    assert result is not None
    assert sorted(p.key for p in result.pairs) == [f"{P}.k_proj.weight", f"{P}.q_proj.weight"]
    q = result.pair(f"{P}.q_proj.weight")
    dW = (W["q"] - Wq).double()
    torch.testing.assert_close(q.update.fro_norm, float(dW.norm()), rtol=1e-5, atol=0)
    torch.testing.assert_close(
        q.update.rel_change, float(dW.norm() / Wq.double().norm()), rtol=1e-5, atol=0
    )
    assert result.pair(f"{P}.k_proj.weight").update.fro_norm == 0.0  # bf16 on both sides


def test_report_shows_the_quantization(tmp_path: Path) -> None:
    from spectra.jobs.report import AnalyzeOptions, analyze
    from spectra.reports.report import headline

    folder, W = _quantized_llama(tmp_path / "gptq")
    analysis = analyze(folder, AnalyzeOptions(device="cpu"), cache=None)
    dtypes = {lm.key: lm.dtype for lm in analysis.layers}
    assert dtypes == {f"{P}.q_proj.weight": "gptq 4-bit group 32", f"{P}.k_proj.weight": "BF16"}
    facts = dict(headline(analysis))
    assert facts["quantization"] == (
        "gptq 4-bit group 32 (1 matrix); analysed dequantized to float32"
    )
    S = torch.linalg.svdvals(W["q"].double())
    lm = analysis.layer(f"{P}.q_proj.weight")
    assert abs(lm.log_spectral_norm - float(torch.log10(S[0] ** 2))) < 1e-5
