"""spectra.formats.peft against PEFT itself: its defaults (a missing `lora_alpha` is 8), its scale
rule, and its rank/alpha pattern resolution (`get_pattern_key`), as read by every spectra path
that reads an adapter (the factor view behind `compare`, and `convert`)."""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from pathlib import Path

import peft
import pytest
import torch
from _adapt_fixtures import one_thread  # noqa: F401
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file

from spectra.analysis.comparison import CompareOptions
from spectra.errors import SourceError, ValidationError
from spectra.export.convert import convert_adapters
from spectra.formats.peft import (
    CONFIG_NAME,
    DEFAULT_LORA_ALPHA,
    DEFAULT_R,
    AdapterContent,
    LoraSettings,
    lora_scale,
    pattern_key,
    pattern_value,
    read_peft_adapter,
    write_peft_adapter,
)
from spectra.jobs.compare import compare
from spectra.sources.adapters import LoraAdapter, MergedCheckpoint
from spectra.sources.checkpoint import Checkpoint


def _nested(paths: list[str], n_in: int = 24, n_out: int = 16, seed: int = 0) -> torch.nn.Module:
    """A module tree with one Linear (n_in -> n_out) at each dotted path."""
    torch.manual_seed(seed)
    root = torch.nn.Module()
    for path in paths:
        *parents, leaf = path.split(".")
        mod = root
        for part in parents:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.add_module(leaf, torch.nn.Linear(n_in, n_out))
    return root


def _peft_folder(base: torch.nn.Module, folder: Path, **config: object) -> torch.nn.Module:
    """Save a PEFT adapter (random nonzero A and B) of `base`'s copy; return the PEFT model."""
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **config)
    )
    model.save_pretrained(str(folder))
    return model


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): mod
        for name, mod in model.named_modules()
        if hasattr(mod, "scaling") and "default" in getattr(mod, "scaling", {})
    }


@pytest.fixture
def no_alpha(tmp_path: Path) -> tuple[Path, Path, torch.nn.Module]:
    """A base checkpoint and a PEFT adapter folder of rank 4 whose config has no `lora_alpha`."""
    base = _nested(["query", "value"])
    (tmp_path / "base").mkdir()
    state = {k: v.detach().contiguous() for k, v in base.state_dict().items()}
    save_file(state, str(tmp_path / "base" / "model.safetensors"))
    folder = tmp_path / "adapter"
    _peft_folder(base, folder, r=4, lora_alpha=99, target_modules=["query", "value"])
    config = json.loads((folder / CONFIG_NAME).read_text())
    del config["lora_alpha"]
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    return tmp_path / "base", folder, base


def test_a_missing_lora_alpha_is_read_as_peft_reads_it(
    no_alpha: tuple[Path, Path, torch.nn.Module],
) -> None:
    """compare (factor view and merged weights), convert's reader and the converted adapter all
    use PEFT's scale: LoraConfig's default lora_alpha 8 over r 4 = 2.0, never alpha = r (1.0)."""
    base_dir, folder, base = no_alpha
    ref = peft.LoraConfig.from_pretrained(str(folder))
    want = ref.lora_alpha / ref.r
    assert (ref.lora_alpha, want) == (DEFAULT_LORA_ALPHA, 2.0)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
    layers = _lora_layers(loaded)
    assert {m: layer.scaling["default"] for m, layer in layers.items()} == dict.fromkeys(
        layers, want
    )
    deltas = {m: layer.get_delta_weight("default").detach() for m, layer in layers.items()}

    with LoraAdapter.open(folder) as ad:  # what compare reads
        assert {m: (mod.alpha, mod.scale) for m, mod in ad.modules.items()} == dict.fromkeys(
            layers, (8.0, want)
        )
        for m, dw in deltas.items():
            torch.testing.assert_close(ad.delta(m), dw, rtol=1e-6, atol=1e-7)
        with Checkpoint.open(base_dir) as ckpt:
            merged = MergedCheckpoint(ckpt, ad)
            for m, dw in deltas.items():
                w = getattr(base, m).weight.detach()
                torch.testing.assert_close(merged.read(f"{m}.weight"), w + dw)
    got = compare(base_dir, folder, CompareOptions(k=2))
    assert got.mode == "lora" and len(got.pairs) == 2
    for pair in got.pairs:
        dw = deltas[pair.key.removesuffix(".weight")].double()
        assert pair.update.fro_norm == pytest.approx(float(torch.linalg.norm(dw)), rel=1e-5)

    adapter = read_peft_adapter(folder)  # what convert reads
    assert {m: adapter.scale(m) for m in adapter.factors} == dict.fromkeys(layers, want)
    conv = convert_adapters(adapter, adapter)
    assert {m: lora_scale(a, 8) for m, a in conv.alphas.items()} == dict.fromkeys(layers, want)


def test_a_missing_r_is_peft_default_and_must_match_the_tensors(
    no_alpha: tuple[Path, Path, torch.nn.Module],
) -> None:
    """Without `r` PEFT builds rank-8 layers (LoraConfig's default) and cannot load rank-4
    factors; spectra refuses the folder the same way instead of guessing r from the tensors."""
    _, folder, _ = no_alpha
    config = json.loads((folder / CONFIG_NAME).read_text())
    del config["r"]
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    assert peft.LoraConfig.from_pretrained(str(folder)).r == DEFAULT_R == 8
    assert LoraSettings.from_config(config, "x").r == DEFAULT_R
    for read in (LoraAdapter.open, read_peft_adapter):
        with pytest.raises(SourceError, match="has rank 4 but the config says 8"):
            read(folder)


PATTERNS = [
    "q_proj",
    "layers.0.q_proj",
    "self_attn.q_proj",
    ".*v_proj",
    r"layers\.1\..*down_proj",
    "^model.layers.0.self_attn.k_proj",
    "^layers.2",
    "self_attn.(q|k)_proj",
    "0.self_attn.q_proj",
    "proj",
    "mlp.down_proj$",
    "ayers.3.mlp.up_proj",
    "up_proj",
    "model.layers.10.self_attn.q_proj",
    "a+b",
]
MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.10.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.xq_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.0.mlp.down_proj",
    "layers.2.self_attn.v_proj",
    "model.layers.3.mlp.up_proj",
    "q_proj",
    "embed_tokens",
    "a+b",  # matches no key as a regex, but is one: PEFT falls back to the path as the key
]


def _orders() -> list[list[str]]:
    rng = random.Random(0)
    orders = [PATTERNS, PATTERNS[::-1], sorted(PATTERNS)]
    orders += [rng.sample(PATTERNS, k) for k in (1, 2, 3, 5, 8) for _ in range(6)]
    orders += [list(p) for p in itertools.permutations(PATTERNS[:4])]
    return orders


@pytest.mark.parametrize("keys", _orders(), ids=lambda k: "|".join(k)[:60])
def test_pattern_resolution_is_peft_get_pattern_key(keys: list[str]) -> None:
    """Same key as PEFT's get_pattern_key, and the same value as LoraModel's
    `rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), r)`, for every module."""
    patterns = {k: i + 1 for i, k in enumerate(keys)}
    for module in MODULES:
        assert pattern_key(keys, module) == get_pattern_key(keys, module), (keys, module)
        want = patterns.get(get_pattern_key(patterns.keys(), module), 99)
        assert pattern_value(patterns, module, 99) == want, (keys, module)


def test_ranks_alphas_and_scales_match_a_peft_model(tmp_path: Path) -> None:
    """A PEFT model with regex and suffix patterns: every module's r, alpha and scaling as PEFT
    built it is what spectra reads back from the saved folder (both readers)."""
    modules = list(MODULES[:9])
    base = _nested(modules, n_in=12, n_out=12)
    model = _peft_folder(
        base,
        tmp_path / "ad",
        r=4,
        lora_alpha=6,
        target_modules=["q_proj", "k_proj", "xq_proj", "down_proj", "v_proj", "up_proj"],
        rank_pattern={
            r"layers\.1\..*down_proj": 2,
            "self_attn.(q|k)_proj": 3,
            "^layers.2.self_attn.v_proj": 5,
        },
        alpha_pattern={"q_proj": 9, ".*v_proj": 1.5, "mlp.down_proj$": 7, "up_proj": 0},
    )
    layers = _lora_layers(model)
    assert set(layers) == set(modules)
    want = {
        m: (layer.r["default"], float(layer.lora_alpha["default"]), layer.scaling["default"])
        for m, layer in layers.items()
    }
    assert len({r for r, _, _ in want.values()}) == 4  # the patterns did hit
    with LoraAdapter.open(tmp_path / "ad") as ad:
        got = {m: (mod.rank, mod.alpha, mod.scale) for m, mod in ad.modules.items()}
    assert got == want
    adapter = read_peft_adapter(tmp_path / "ad")
    got = {m: (adapter.rank(m), adapter.alpha(m), adapter.scale(m)) for m in adapter.factors}
    assert got == want


@pytest.mark.parametrize(
    ("alpha", "rank", "rslora", "want"),
    [(8, 4, False, 2.0), (8, 4, True, 4.0), (0, 4, False, 0.0), (-2, 4, False, -0.5)],
)
def test_lora_scale_is_peft_formula(alpha: float, rank: int, rslora: bool, want: float) -> None:
    """PEFT's LoraLayer.update_layer: lora_alpha / r, or / sqrt(r); any finite alpha."""
    ref = alpha / math.sqrt(rank) if rslora else alpha / rank
    assert lora_scale(alpha, rank, rslora=rslora) == ref == want


@pytest.mark.parametrize(
    ("alpha", "rank"), [(8, 0), (8, -1), (8, 2.5), (8, True), (math.nan, 4), (math.inf, 4)]
)
def test_lora_scale_rejects(alpha: float, rank: int) -> None:
    with pytest.raises(ValidationError):
        lora_scale(alpha, rank)


def test_written_folder_loads_in_peft_with_the_written_scales(tmp_path: Path) -> None:
    """The writer's config resolves, under PEFT, to each module's own rank and alpha, including
    a module that is a dotted suffix of another (its key is anchored)."""
    paths = ["a.q", "x.a.q", "layer.1.q", "layer.11.q"]
    base = _nested(paths, n_in=6, n_out=8)
    g = torch.Generator().manual_seed(1)
    ranks = {"a.q": 1, "x.a.q": 2, "layer.1.q": 3, "layer.11.q": 2}
    factors = {
        m: (torch.randn(r, 6, generator=g), torch.randn(8, r, generator=g))
        for m, r in ranks.items()
    }
    alphas = {"a.q": 1.0, "x.a.q": 4.0, "layer.1.q": 2.5, "layer.11.q": 4.0}
    write_peft_adapter(tmp_path / "ad", AdapterContent(factors, alphas))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad"))
    for m, layer in _lora_layers(loaded).items():
        assert layer.r["default"] == ranks[m], m
        assert layer.scaling["default"] == lora_scale(alphas[m], ranks[m]), m
        A, B = factors[m]
        torch.testing.assert_close(layer.lora_A["default"].weight.detach(), A)
        torch.testing.assert_close(layer.lora_B["default"].weight.detach(), B)
    with pytest.raises(ValidationError, match="same modules"):
        AdapterContent(factors, {"a.q": 1.0})
