"""`spectra mitigate` on a real LoRA fine-tune of the bundled MiniLM (tests/_mitigate_fixtures:
3 PEFT training steps, intruders planted in two modules): PEFT 0.21.2's own
reduce_intruder_dimension, PEFT loading the written adapter, transformers loading the written
checkpoint, and `spectra compare` of both results."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from _mitigate_fixtures import PLANTED, R, peft_reduced, reference, train_and_plant
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from spectra.analysis.comparison import CompareOptions
from spectra.formats.peft import read_peft_adapter
from spectra.jobs.compare import compare
from spectra.jobs.mitigate import REPORT_NAME, MitigateOptions, mitigate

pytest.importorskip("peft")
pytest.importorskip("transformers")

K, EPS = 10, 0.5
SELECT = ("encoder.layer.0.*", "encoder.layer.3.*")  # the adapted layers


@pytest.fixture(scope="module")
def trained(minilm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_and_plant(minilm_path, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="module")
def extended(minilm_path: Path, trained: Path, tmp_path_factory: pytest.TempPathFactory):
    """Our default ("extend") mitigation with lambda 0.1: every planted direction leaves the
    top-10 (0.1 x 2.5 S_1 < S_10 of the base)."""
    out = tmp_path_factory.mktemp("extend") / "out"
    return mitigate(minilm_path, trained, out, MitigateOptions(lam=0.1, device="cpu"))


def _merged_weights(minilm: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """{base key: W + s B A} of every adapted module (float64)."""
    ad = read_peft_adapter(adapter)
    with safe_open(minilm / "model.safetensors", "pt") as fh:
        return {
            f"{m}.weight": fh.get_tensor(f"{m}.weight").double()
            + ad.scale(m) * (b.double() @ a.double())
            for m, (a, b) in ad.factors.items()
        }


def test_peft_policy_equals_peft_reduce_intruder_dimension(
    minilm_path: Path, trained: Path, tmp_path: Path
) -> None:
    lam = 0.75  # PEFT's default
    theirs = peft_reduced(minilm_path, trained, K, EPS, lam)
    res = mitigate(
        minilm_path, trained, tmp_path / "out", MitigateOptions(lam=lam, rank_policy="peft")
    )
    ours = read_peft_adapter(res.out)
    counts = {m.ft_key: len(m.directions) for m in res.matrices}
    assert counts == {m: c for m, (_, _, c) in theirs.items()}  # PEFT's logged counts
    assert {m: c for m, c in counts.items() if c} == {m: len(v) for m, v in PLANTED.items()}
    for module, (a, b) in ours.factors.items():
        assert a.shape[0] == R  # PEFT keeps the rank
        delta = ours.scale(module) * (b.double() @ a.double())
        want = theirs[module][1].detach()
        # PEFT decomposes in float32; we in float64: agreement to float32 precision
        assert float((delta - want).norm() / want.norm()) < 1e-5, module


def test_extended_adapter_loads_in_peft_and_reproduces_w_prime(
    minilm_path: Path, trained: Path, extended
) -> None:
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    merged = _merged_weights(minilm_path, trained)
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_path), extended.out).eval()
    dense = AutoModel.from_pretrained(minilm_path).eval()
    layers = dict(model.named_modules())
    params = dict(dense.named_parameters())
    for row in extended.matrices:
        layer = layers[f"base_model.model.{row.ft_key}"]
        w0 = layer.get_base_layer().weight.double()
        want, idx = reference(w0, merged[row.key], K, EPS, 0.1)
        assert [d.index for d in row.directions] == idx
        assert layer.r["default"] == R + len(idx)
        got = w0 + layer.get_delta_weight("default").double()
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
        with torch.no_grad():
            params[row.key].copy_(want.float())
    assert sum(len(m.directions) for m in extended.matrices) == 3
    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = tok(
        ["intruder dimensions", "a second, longer sentence here"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model(**batch).last_hidden_state,
            dense(**batch).last_hidden_state,
            rtol=1e-4,
            atol=1e-4,
        )


def test_compare_of_the_result_shows_the_directions_gone(
    minilm_path: Path, trained: Path, extended
) -> None:
    opts = CompareOptions(k=K, epsilons=(EPS,), device="cpu")
    before = compare(minilm_path, trained, opts)
    after = compare(minilm_path, extended.out, opts)
    for row in extended.matrices:
        planted = len(PLANTED.get(row.ft_key, ()))
        assert before.pair(row.key).intruders.count(EPS) == planted == len(row.directions)
        assert all(d.new_position >= K for d in row.directions)
        assert after.pair(row.key).intruders.count(EPS) == row.intruders_after == 0


def test_merged_checkpoint_is_mitigated_shard_by_shard(
    minilm_path: Path, trained: Path, extended, tmp_path: Path
) -> None:
    from transformers import AutoModel

    merged_dir = tmp_path / "merged"
    shutil.copytree(minilm_path, merged_dir)
    weights = load_file(merged_dir / "model.safetensors")
    for key, w in _merged_weights(minilm_path, trained).items():
        weights[key] = w.float()
    save_file(weights, merged_dir / "model.safetensors", {"format": "pt"})
    res = mitigate(
        minilm_path,
        merged_dir,
        tmp_path / "out",
        MitigateOptions(lam=0.1, roles=("q", "v"), include=SELECT, device="cpu"),
    )
    assert res.mode == "checkpoint" and len(res.matrices) == 4
    changed = {m.key: [d.index for d in m.directions] for m in res.changed}
    assert changed == {m.key: [d.index for d in m.directions] for m in extended.changed}
    out = res.out
    # the residual writer's side files (config, tokenizer, sentence-transformers folders) and
    # shard; nothing else of the source folder (data_config.json, .gitattributes stay behind)
    listing = {p.relative_to(out) for p in out.rglob("*") if not p.name.startswith(".")}
    assert {p.relative_to(merged_dir) for p in merged_dir.rglob("*")} >= listing - {
        Path(REPORT_NAME)
    }
    for name in ("model.safetensors", "config.json", "tokenizer.json", "modules.json"):
        assert (out / name).read_bytes() == (merged_dir / name).read_bytes() or name.startswith(
            "model"
        )
    assert (out / "1_Pooling" / "config.json").is_file()
    adapter = _merged_weights(minilm_path, extended.out)  # W_0 + s B' A' of our adapter
    with (
        safe_open(merged_dir / "model.safetensors", "pt") as fs,
        safe_open(out / "model.safetensors", "pt") as fd,
    ):
        assert list(fs.keys()) == list(fd.keys())
        for name in fs.keys():  # noqa: SIM118
            src, dst = fs.get_tensor(name), fd.get_tensor(name)
            assert dst.dtype == src.dtype
            if name in changed:
                torch.testing.assert_close(dst.double(), adapter[name], rtol=0, atol=2e-6)
            else:
                assert torch.equal(src, dst), name
    AutoModel.from_pretrained(out)  # transformers loads it
    opts = CompareOptions(k=K, epsilons=(EPS,), roles=("q", "v"), include=SELECT, device="cpu")
    after = compare(minilm_path, out, opts)
    assert after.forensics.intruders_total == {"0.5": 0}
