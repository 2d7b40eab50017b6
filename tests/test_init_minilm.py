"""End to end on the real all-MiniLM-L6-v2: PEFT loads our adapter on our residual base and the
model computes what the original base computes; our PiSSA equals PEFT's own."""

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

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModel  # noqa: E402

from spectra.errors import ValidationError  # noqa: E402
from spectra.jobs.init import InitOptions, init_adapter  # noqa: E402

# Four matrices of both aspect ratios in two layers keep each init short (2 shared CPU cores).
TARGETS = (
    "encoder.layer.0.attention.self.query,encoder.layer.0.attention.self.value,"
    "encoder.layer.0.intermediate.dense,encoder.layer.5.output.dense"
)
Q0 = "encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.randint(1000, 29000, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(minilm_path: Path, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return AutoModel.from_pretrained(minilm_path).eval()(input_ids=inputs).last_hidden_state


def _peft_output(residual: Path, adapter: Path, inputs: torch.Tensor) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(residual), adapter).eval()
    with torch.no_grad():
        return model(input_ids=inputs).last_hidden_state


CASES = [
    ("pissa", None, None, False),
    ("milora", "energy", 24, True),
    ("olora", "alpha-power", 24, False),
    ("pissa", "alpha-linear", 24, True),
]


@pytest.mark.parametrize(("method", "allocator", "budget", "rslora"), CASES)
def test_peft_output_equals_the_original_base(
    minilm_path: Path,
    tmp_path: Path,
    inputs: torch.Tensor,
    reference: torch.Tensor,
    method: str,
    allocator: str | None,
    budget: int | None,
    rslora: bool,
) -> None:
    res = init_adapter(
        minilm_path,
        InitOptions(
            out=tmp_path / "o",
            method=method,
            rank=8,
            targets=TARGETS,
            allocator=allocator,
            budget=budget,
            rslora=rslora,
            alpha=None,
        ),
    )
    assert len(res.plan.modules) == 4
    ranks = res.plan.ranks
    if allocator is None:
        assert set(ranks.values()) == {8}
    else:
        assert sum(ranks.values()) == budget and len(set(ranks.values())) > 1
    assert res.max_error < 1e-6
    out = _peft_output(res.residual_dir, res.adapter_dir, inputs)
    assert float((out - reference).abs().max()) <= 1e-4
    manifest = json.loads(res.manifest_path.read_text())
    assert manifest["method"] == method and manifest["ranks"] == ranks
    assert manifest["source_files"][0]["name"] == "model.safetensors"
    assert len(manifest["matrices"]) == 4
    assert res.to_dict()["plan"]["modules"][0]["rank"] == ranks[res.plan.modules[0].module]
    # A broken adapter would not match: negative control on the same pipeline.
    wrong = PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_path), res.adapter_dir)
    with torch.no_grad():
        moved = wrong.eval()(input_ids=inputs).last_hidden_state
    assert float((moved - reference).abs().max()) > 1e-2


def test_our_pissa_matches_peft_pissa(minilm_path: Path, tmp_path: Path) -> None:
    targets = [Q0, "encoder.layer.0.intermediate.dense"]
    res = init_adapter(
        minilm_path,
        InitOptions(out=tmp_path / "o", method="pissa", rank=8, targets=targets, alpha=16.0),
    )
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights="pissa")
    peft_model = get_peft_model(AutoModel.from_pretrained(minilm_path), cfg)
    ours = PeftModel.from_pretrained(AutoModel.from_pretrained(res.residual_dir), res.adapter_dir)
    for name in targets:
        theirs_layer = peft_model.base_model.model.get_submodule(name)
        our_layer = ours.base_model.model.get_submodule(name)
        ba_theirs = theirs_layer.lora_B["default"].weight @ theirs_layer.lora_A["default"].weight
        ba_ours = our_layer.lora_B["default"].weight @ our_layer.lora_A["default"].weight
        rel = torch.linalg.matrix_norm(ba_ours - ba_theirs) / torch.linalg.matrix_norm(ba_theirs)
        assert float(rel.detach()) < 1e-3, name
        res_diff = our_layer.base_layer.weight - theirs_layer.base_layer.weight
        assert float(res_diff.abs().max()) < 1e-4


def test_reload_after_simulated_training(
    minilm_path: Path, tmp_path: Path, inputs: torch.Tensor
) -> None:
    res = init_adapter(
        minilm_path, InitOptions(out=tmp_path / "o", method="pissa", rank=4, targets=[Q0])
    )
    model = PeftModel.from_pretrained(
        AutoModel.from_pretrained(res.residual_dir), res.adapter_dir, is_trainable=True
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=inputs).last_hidden_state
    model.save_pretrained(tmp_path / "trained")
    saved = json.loads((tmp_path / "trained" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True  # PEFT keeps ours: no re-decomposition on load
    again = _peft_output(res.residual_dir, tmp_path / "trained", inputs)
    assert float((again - trained).abs().max()) <= 1e-5


def test_errors_name_what_exists(minilm_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="no weight matrix matched targets gate: roles here"):
        init_adapter(
            minilm_path, InitOptions(out=tmp_path / "a", method="pissa", rank=4, targets="gate")
        )
    with pytest.raises(ValidationError, match="exceeds min\\(m, n\\) = 384"):
        init_adapter(
            minilm_path, InitOptions(out=tmp_path / "b", method="pissa", rank=400, targets=[Q0])
        )
    with pytest.raises(ValidationError, match="embedding"):
        init_adapter(
            minilm_path,
            InitOptions(out=tmp_path / "c", method="pissa", rank=4, targets="*embeddings*"),
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_synthetic_sharded_llama_round_trip(tmp_path: Path) -> None:
    """A tiny Llama saved in 3 shards: the residual keeps the shard layout and the index, the
    untouched tensors are byte-identical, and PEFT on the residual reproduces the original."""
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
    )
    src = tmp_path / "llama"
    LlamaModel(cfg).save_pretrained(src, max_shard_size="80KB")
    shards = sorted(src.glob("*.safetensors"))
    assert len(shards) >= 3
    res = init_adapter(
        src,
        InitOptions(
            out=tmp_path / "o",
            method="pissa",
            rank=4,
            targets="q,v,gate,down",
            allocator="energy",
            budget=40,
            rslora=True,
        ),
    )
    assert len(res.plan.modules) == 8 and sum(res.plan.ranks.values()) == 40
    out_shards = sorted(res.residual_dir.glob("*.safetensors"))
    assert [p.name for p in out_shards] == [p.name for p in shards]
    assert (res.residual_dir / "model.safetensors.index.json").is_file()
    changed = {m.key for m in res.plan.modules}
    for a_path, b_path in zip(shards, out_shards, strict=True):
        with safe_open(str(a_path), "pt") as a, safe_open(str(b_path), "pt") as b:
            for k in a.keys():  # noqa: SIM118
                same = torch.equal(a.get_tensor(k), b.get_tensor(k))
                assert same is (k not in changed), k
    x = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        ref = LlamaModel.from_pretrained(src).eval()(input_ids=x).last_hidden_state
        model = PeftModel.from_pretrained(
            LlamaModel.from_pretrained(res.residual_dir), res.adapter_dir
        ).eval()
        got = model(input_ids=x).last_hidden_state
    assert float((got - ref).abs().max()) <= 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_adapter_still_reproduces_the_base(
    minilm_path: Path, tmp_path: Path, inputs: torch.Tensor, reference: torch.Tensor, dtype: str
) -> None:
    """The residual absorbs the rounding of the stored factors: W_res + s B A == W up to the
    residual's own float32 rounding, and the manifest's error is the one of the stored files."""
    from safetensors.torch import load_file

    res = init_adapter(
        minilm_path,
        InitOptions(out=tmp_path / "o", method="pissa", rank=16, targets=[Q0], dtype=dtype),
    )
    stored = load_file(str(res.adapter_dir / "adapter_model.safetensors"))
    A = stored[f"base_model.model.{Q0}.lora_A.weight"]
    B = stored[f"base_model.model.{Q0}.lora_B.weight"]
    assert A.dtype == getattr(torch, dtype)
    W = load_file(str(minilm_path / "model.safetensors"))[f"{Q0}.weight"].double()
    W_res = load_file(str(res.residual_dir / "model.safetensors"))[f"{Q0}.weight"].double()
    scale = res.plan.modules[0].scale
    actual = float(
        torch.linalg.matrix_norm(W - (W_res + scale * (B.double() @ A.double())))
        / torch.linalg.matrix_norm(W)
    )
    assert actual < 1e-6  # float32 rounding of the residual only (was 1.25e-3 for bf16)
    manifest = json.loads(res.manifest_path.read_text())
    assert manifest["max_reconstruction_error"] == pytest.approx(actual, rel=1e-6, abs=1e-12)
    assert res.errors[f"{Q0}.weight"] == pytest.approx(actual, rel=1e-6, abs=1e-12)
    out = _peft_output(res.residual_dir, res.adapter_dir, inputs)
    assert float((out - reference).abs().max()) <= 1e-4


def test_a_refused_out_fails_before_any_work(
    minilm_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-empty --out without --force is refused before the checkpoint is opened or any
    calibration runs (a refusal after minutes of SVD/calibration work wastes them)."""
    import spectra.jobs.init as init_job
    from spectra.errors import OutputError
    from spectra.sources.checkpoint import Checkpoint

    calls: list[str] = []

    def spy(*args: object, **kwargs: object) -> None:
        calls.append("work")
        raise AssertionError("work started before the output folder was checked")

    monkeypatch.setattr(init_job, "method_statistics", spy)
    monkeypatch.setattr(init_job, "load_stats", spy)
    monkeypatch.setattr(Checkpoint, "open", spy)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    for method in ("eva", "pissa"):
        with pytest.raises(OutputError, match="already exists.*--force"):
            init_adapter(minilm_path, InitOptions(out=taken, method=method, rank=4, targets=[Q0]))
    assert calls == []
    assert (taken / "notes.txt").read_text() == "keep me"
