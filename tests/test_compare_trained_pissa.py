"""`compare BASE TRAINED_ADAPTER` for an adapter trained from `spectra init`'s output on its
residual base (issue 14, case 10): the true update on the original base is s (B A - B0 A0), not
s B A (which counts the principal part twice). Checked against the fine-tuned model itself:
residual base + s B A, merged by hand and compared as a checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _adapt_fixtures import one_thread  # noqa: F401 (module-wide, one torch thread)
from safetensors.torch import load_file, save_file

from spectra.analysis.compare_inputs import init_folder
from spectra.analysis.comparison import CompareOptions
from spectra.errors import SourceError
from spectra.formats.peft import read_peft_adapter
from spectra.jobs.compare import compare
from spectra.jobs.init import InitOptions, init_adapter

OPTS = CompareOptions(roles=("q",), k=2, device="cpu", epsilons=(0.5,))


@pytest.fixture(scope="module")
def trained(minilm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A PiSSA init, an adapter 'trained' from it (factors moved by seeded noise, saved as PEFT
    saves it: base_model_name_or_path = the residual base it was loaded onto) and the trained
    model merged by hand (residual base + s B A)."""
    root = tmp_path_factory.mktemp("pissa")
    init = root / "init"
    init_adapter(minilm_path, InitOptions(out=init, method="pissa", rank=2, targets=["q"]))
    initial = read_peft_adapter(init / "adapter")
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for module, (a0, b0) in initial.factors.items():
        a = a0 + 0.05 * a0.std() * torch.randn(a0.shape, generator=g)
        b = b0 + 0.05 * b0.std() * torch.randn(b0.shape, generator=g)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    out = root / "work" / "trained"
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = dict(initial.config, base_model_name_or_path=str(init / "residual_base"))
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    # the fine-tuned model as PEFT would merge it: residual base + s B A
    residual = init / "residual_base"
    merged = root / "merged"
    shutil.copytree(residual, merged)
    (st,) = sorted(merged.glob("*.safetensors"))
    weights = load_file(str(st))
    for module in initial.factors:
        key = f"{module}.weight"
        a = tensors[f"base_model.model.{module}.lora_A.weight"].double()
        b = tensors[f"base_model.model.{module}.lora_B.weight"].double()
        weights[key] = (weights[key].double() + initial.scale(module) * b @ a).float()
    save_file(weights, str(st), metadata={"format": "pt"})
    return {"init": init, "trained": out, "merged": merged, "base": minilm_path}


def test_trained_adapter_is_compared_as_its_true_update(trained: dict[str, Path]) -> None:
    via_adapter = compare(trained["base"], trained["trained"], OPTS)
    via_model = compare(trained["base"], trained["merged"], OPTS)
    assert via_adapter is not None and via_model is not None
    model = {p.key: p for p in via_model.pairs}
    assert len(via_adapter.pairs) == 6
    for p in via_adapter.pairs:
        want = model[p.key].update
        # before: rel_change counted s B0 A0 (the principal part) twice, e.g. 0.22 for 0.004
        assert p.update.rel_change == pytest.approx(want.rel_change, rel=2e-3), p.key
        assert p.update.fro_norm == pytest.approx(want.fro_norm, rel=2e-3), p.key
        top, top_want = p.update.top_singular_values[:4], want.top_singular_values[:4]
        assert top == pytest.approx(top_want, rel=1e-2), p.key
        # B A - B0 A0 has rank 2r = 4, not r = 2
        assert p.update.numerical_rank == 4, p.key


def test_detection_by_base_path_or_by_place(trained: dict[str, Path], tmp_path: Path) -> None:
    cfg = json.loads((trained["trained"] / "adapter_config.json").read_text())
    assert init_folder(trained["trained"], cfg) == trained["init"].resolve()
    # relative to the adapter's parent, as a user who trained from that folder wrote it
    rel = dict(cfg, base_model_name_or_path="../init/residual_base")
    assert init_folder(trained["trained"], rel) == trained["init"].resolve()
    # a name that is no residual base of an init: a plain LoRA
    for other in ("org/model", "x" * 5000, "a\x00b", str(trained["base"]), None, 7):
        assert init_folder(trained["trained"], dict(cfg, base_model_name_or_path=other)) is None
    # placed inside the init folder, whatever the config names
    inside = trained["init"] / "trained-copy"
    shutil.copytree(trained["trained"], inside)
    assert (
        init_folder(inside, dict(cfg, base_model_name_or_path="org/model"))
        == trained["init"].resolve()
    )
    # the init's own adapter is not "trained from" it (it keeps the ResidualBaseWarning)
    own = trained["init"] / "adapter"
    assert init_folder(own, json.loads((own / "adapter_config.json").read_text())) is None


def test_an_adapter_not_trained_from_that_init_is_refused(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    shutil.copytree(trained["trained"], wrong)
    tensors = load_file(str(wrong / "adapter_model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if ".layer.0." not in k}
    save_file(tensors, str(wrong / "adapter_model.safetensors"))
    with pytest.raises(SourceError, match="trained from this init"):
        compare(trained["base"], wrong, OPTS)
