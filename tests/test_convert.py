"""Conversion of a trained PiSSA/MiLoRA/OLoRA adapter into a plain LoRA on the original base."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from _adapt_fixtures import one_thread  # noqa: F401

from spectra.errors import ValidationError
from spectra.export.convert import convert_adapters, doubled_alpha, stack_factors
from spectra.formats.peft import AdapterContent, read_peft_adapter, write_peft_adapter


def test_stacked_factors_give_the_difference_of_updates() -> None:
    g = torch.Generator().manual_seed(0)
    A, A0 = (
        torch.randn(3, 7, generator=g, dtype=torch.float64),
        torch.randn(3, 7, generator=g, dtype=torch.float64),
    )
    B, B0 = (
        torch.randn(5, 3, generator=g, dtype=torch.float64),
        torch.randn(5, 3, generator=g, dtype=torch.float64),
    )
    A2, B2 = stack_factors(A, B, A0, B0)
    assert A2.shape == (6, 7) and B2.shape == (5, 6)
    torch.testing.assert_close(B2 @ A2, B @ A - B0 @ A0)
    with pytest.raises(ValidationError, match="do not match the initial"):
        stack_factors(A[:2], B[:, :2], A0, B0)


@pytest.mark.parametrize(("rslora", "factor"), [(False, 2.0), (True, math.sqrt(2.0))])
def test_alpha_keeps_the_scale(rslora: bool, factor: float) -> None:
    assert doubled_alpha(8.0, rslora=rslora) == pytest.approx(8.0 * factor)
    s = 8.0 / (math.sqrt(4) if rslora else 4)
    s2 = doubled_alpha(8.0, rslora=rslora) / (math.sqrt(8) if rslora else 8)
    assert s2 == pytest.approx(s)


def test_convert_in_memory_checks_scales_and_modules(tmp_path: Path) -> None:
    f = {"m": (torch.ones(2, 3), torch.ones(4, 2))}
    write_peft_adapter(tmp_path / "i", AdapterContent(f, {"m": 2.0}))
    write_peft_adapter(tmp_path / "t", AdapterContent(f, {"m": 4.0}))
    write_peft_adapter(tmp_path / "u", AdapterContent({"n": f["m"]}, {"n": 2.0}))
    init = read_peft_adapter(tmp_path / "i")
    with pytest.raises(ValidationError, match="scale changed"):
        convert_adapters(init, read_peft_adapter(tmp_path / "t"))
    with pytest.raises(ValidationError, match="different modules"):
        convert_adapters(init, read_peft_adapter(tmp_path / "u"))
    conv = convert_adapters(init, init)
    assert conv.alphas == {"m": 4.0}
    A2, B2 = conv.factors["m"]
    assert float((B2 @ A2).abs().max()) == 0.0  # untrained: no change on the original base


@pytest.mark.parametrize(("method", "rslora"), [("pissa", False), ("olora", True)])
def test_converted_adapter_on_the_original_base_reproduces_training(
    minilm_path: Path, tmp_path: Path, method: str, rslora: bool
) -> None:
    pytest.importorskip("peft")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import PeftModel
    from transformers import AutoModel

    from spectra.jobs.convert import convert_to_lora
    from spectra.jobs.init import InitOptions, init_adapter

    targets = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"]
    res = init_adapter(
        minilm_path,
        InitOptions(
            out=tmp_path / "init", method=method, rank=4, targets=targets, alpha=8.0, rslora=rslora
        ),
    )
    model = PeftModel.from_pretrained(
        AutoModel.from_pretrained(res.residual_dir), res.adapter_dir, is_trainable=True
    )
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    x = torch.randint(1000, 29000, (2, 9), generator=g)
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=x).last_hidden_state
    model.save_pretrained(tmp_path / "trained")

    out = convert_to_lora(tmp_path / "init", tmp_path / "trained", tmp_path / "lora")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert set(cfg["rank_pattern"].values()) == {8}
    assert cfg["base_model_name_or_path"] == str(minilm_path)
    assert cfg["init_lora_weights"] is True and cfg["use_rslora"] is rslora
    plain = PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_path), out).eval()
    with torch.no_grad():
        got = plain(input_ids=x).last_hidden_state
    assert float((got - trained).abs().max()) <= 1e-4
    # Negative control: the trained adapter alone on the original base is wrong.
    wrong = PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_path), tmp_path / "trained")
    with torch.no_grad():
        off = wrong.eval()(input_ids=x).last_hidden_state
    assert float((off - trained).abs().max()) > 1e-2


def _synthetic_init(folder: Path, source: str | None) -> tuple[Path, Path]:
    """A `spectra init`-shaped folder (adapter/ and, when ``source`` is given, spectra.json) and
    an adapter "trained" from it on the residual base, as PEFT saves it."""
    from spectra.export.manifest import build_manifest, write_manifest

    g = torch.Generator().manual_seed(3)
    f0 = {"m": (torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g))}
    residual = str(folder / "residual_base")
    init = AdapterContent(f0, {"m": 2.0}, base_model_name_or_path=residual)
    write_peft_adapter(folder / "adapter", init)
    if source is not None:
        manifest = build_manifest(
            kind="init",
            method="pissa",
            source=source,
            source_files=[],
            options={},
            plan={},
            matrices={},
        )
        write_manifest(folder, manifest)
    f1 = {"m": (f0["m"][0] + 0.1, f0["m"][1] - 0.1)}
    head = {"base_model.model.classifier.weight": torch.randn(3, 4, generator=g)}
    trained = AdapterContent(
        f1,
        {"m": 2.0},
        base_model_name_or_path=residual,
        other=head,
        config_extra={"modules_to_save": ["classifier"], "task_type": "SEQ_CLS"},
    )
    write_peft_adapter(folder.parent / "trained", trained)
    return folder / "adapter", folder.parent / "trained"


def test_convert_from_the_adapter_subfolder_finds_the_original_base(tmp_path: Path) -> None:
    """`--init DIR/adapter` reads DIR/spectra.json: the plain LoRA names the original base, never
    the residual base the trained adapter was saved against."""
    from spectra.jobs.convert import convert_to_lora

    adapter, trained = _synthetic_init(tmp_path / "init", "/models/original")
    for init in (adapter, adapter.parent):
        out = convert_to_lora(init, trained, tmp_path / f"lora-{init.name}")
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == "/models/original", init
        assert json.loads((out / "spectra.json").read_text())["source"] == "/models/original"
    out = convert_to_lora(adapter, trained, tmp_path / "lora-b", base="/models/explicit")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "/models/explicit"


def test_convert_refuses_when_the_original_base_is_unknown(tmp_path: Path) -> None:
    from spectra.jobs.convert import convert_to_lora

    adapter, trained = _synthetic_init(tmp_path / "init", None)
    with pytest.raises(ValidationError, match="original base.*--base"):
        convert_to_lora(adapter, trained, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    out = convert_to_lora(adapter, trained, tmp_path / "lora", base="/models/original")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "/models/original"


def test_convert_keeps_modules_to_save_and_task_type(tmp_path: Path) -> None:
    """A trained head (modules_to_save) and the task type survive the conversion: without them
    in the config PEFT would silently ignore the copied head tensor."""
    from safetensors.torch import load_file

    from spectra.jobs.convert import convert_to_lora

    adapter, trained = _synthetic_init(tmp_path / "init", "/models/original")
    out = convert_to_lora(adapter.parent, trained, tmp_path / "lora")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier"] and cfg["task_type"] == "SEQ_CLS"
    head = load_file(str(trained / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    name = "base_model.model.classifier.weight"
    assert torch.equal(got[name], head[name])
