"""Adapters spectra cannot read as dW = scale * B @ A, and regex keys that would hang matching,
are refused in one line (issue 14, cases 4 and 6). Regex bombs run in a child process with a
timeout, so a regression fails the test instead of hanging the suite."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _source_fixtures import write_lora_adapter, write_safetensors

from spectra.errors import SourceError
from spectra.formats.peft import (
    MATCH_BUDGET,
    check_match_cost,
    check_pattern,
    pattern_key,
    read_peft_adapter,
)
from spectra.sources.adapters import LoraAdapter

SHAPES = {"layers.0.q_proj.weight": (8, 6), "layers.0.v_proj.weight": (8, 6)}
LONG_MODULE = ".".join(["m"] * 75)  # 149 characters, as in the reproduction
BOMBS = [
    ".*.*.*.*.*.*.*.*X",  # polynomial backtracking of degree 9: passed the nested-repeat check
    "(.|.)*Z",  # alternation under a repeat: exponential
    "(a+)+$",
    "(x|xy)*Q",
    r"(m)\1*",  # backreference
    r"(?=(.*)*)m",  # a nested repeat inside a lookahead
    ".{0,99}.{0,99}.{0,99}X",
]
PEFT_USUAL = [
    "q_proj",
    "model.layers.0.self_attn.q_proj",
    r"model\.layers\.0\.self_attn\.q_proj",
    r".*\.q_proj",
    ".*q_proj",
    r"^model\.layers\.(0|1)\..*",
    "model.layers.(0|1).q",
    "model.decoder.layers.*.encoder_attn.k_proj",
    "^" + r"model\.layers\.12\.mlp\.down_proj",
]


def _child(code: str, timeout: float = 120.0) -> str:
    """Run `code` in a fresh interpreter; a hang is a test failure after `timeout` seconds (which
    include importing torch on a loaded machine; the refusal itself is timed in the child)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s (regex backtracking?): {code[:200]}")
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("key", BOMBS)
def test_regex_bombs_are_refused(key: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(SourceError, match="rank_pattern") as err:
        check_pattern(key, "rank_pattern key")
    assert time.perf_counter() - t0 < 0.5
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key", PEFT_USUAL)
def test_peft_usual_patterns_pass(key: str) -> None:
    check_pattern(key, "rank_pattern key")
    pattern_key([key], "base_model.model.model.layers.0.self_attn.q_proj")


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
@pytest.mark.parametrize("key", BOMBS[:2])
def test_bomb_in_an_adapter_is_refused_in_time(tmp_path: Path, field: str, key: str) -> None:
    """The issue's reproduction: a 149-character module path and a bomb key; opening the adapter
    (compare's reader) and reading it eagerly (convert's reader) both refuse it at once."""
    folder = write_lora_adapter(tmp_path / "a", {f"{LONG_MODULE}.weight": (8, 6)}, r=4)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg[field] = {key: 4 if field == "rank_pattern" else 8}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    out = _child(
        "from spectra.errors import SourceError\n"
        "from spectra.sources.adapters import LoraAdapter\n"
        "from spectra.formats.peft import read_peft_adapter\n"
        "import time\n"
        "for fn in (LoraAdapter.open, read_peft_adapter):\n"
        "    t0 = time.perf_counter()\n"
        "    try:\n"
        f"        fn({str(folder)!r})\n"
        "    except SourceError as e:\n"
        "        print(time.perf_counter() - t0, 'REFUSED', str(e).replace(chr(10), ' '))\n"
    )
    lines = [line.split(" ", 1) for line in out.splitlines()]
    assert len(lines) == 2 and all(x.startswith("REFUSED") and field in x for _, x in lines), out
    assert all(float(t) < 2.0 for t, _ in lines), out


def test_many_wildcard_keys_against_long_paths_hit_the_budget(tmp_path: Path) -> None:
    """Keys that each pass the policy, but together against long module paths would take
    minutes, are refused before matching."""
    modules = [".".join(["m"] * 400) + f".x{i}" for i in range(20)]
    keys = [f".*.*Z{i}" for i in range(20)]
    with pytest.raises(SourceError, match="too long"):
        check_match_cost(keys, modules, "rank_pattern")
    check_match_cost(keys, ["model.layers.0.self_attn.q_proj"] * 50, "rank_pattern")
    assert MATCH_BUDGET <= 2 * 10**9


def test_module_path_length_is_bounded(tmp_path: Path) -> None:
    folder = write_lora_adapter(tmp_path / "a", {"m" * 1500 + ".weight": (8, 6)}, r=4)
    with pytest.raises(SourceError, match="longer than 1000 characters"):
        LoraAdapter.open(folder)


def test_an_invalid_regex_is_a_source_error_in_both_readers(tmp_path: Path) -> None:
    folder = write_lora_adapter(tmp_path / "a", SHAPES, r=4)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"(": 2}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    for fn in (LoraAdapter.open, read_peft_adapter):
        with pytest.raises(SourceError, match="alpha_pattern.*not a valid regular expression"):
            fn(folder)


# --- case 6: DoRA, embedding factors, two adapter names ----------------------------------------


def _add_tensors(folder: Path, extra: dict[str, torch.Tensor], drop: tuple[str, ...] = ()) -> None:
    from safetensors.torch import load_file

    weights = folder / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(str(weights)).items() if k not in drop}
    tensors.update(extra)
    write_safetensors(weights, tensors, metadata={"format": "pt"})


@pytest.mark.parametrize("reader", [LoraAdapter.open, read_peft_adapter])
def test_dora_is_refused(tmp_path: Path, reader: object) -> None:
    folder = write_lora_adapter(tmp_path / "a", SHAPES, r=4)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="use_dora is True: a DoRA adapter") as err:
        reader(folder)  # type: ignore[operator]
    assert "\n" not in str(err.value)
    # the magnitude vector alone (a config that hides use_dora) is refused too
    cfg["use_dora"] = False
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    _add_tensors(folder, {"base_model.model.layers.0.q_proj.lora_magnitude_vector": torch.ones(8)})
    with pytest.raises(SourceError, match="DoRA adapter \\(lora_magnitude_vector\\)"):
        reader(folder)  # type: ignore[operator]


def test_embedding_factors_are_refused_not_dropped(tmp_path: Path) -> None:
    folder = write_lora_adapter(tmp_path / "a", SHAPES, r=4)
    _add_tensors(
        folder,
        {
            "base_model.model.embed_tokens.lora_embedding_A": torch.ones(4, 32),
            "base_model.model.embed_tokens.lora_embedding_B": torch.ones(8, 4),
        },
    )
    for reader in (LoraAdapter.open, read_peft_adapter):
        with pytest.raises(SourceError, match="embedding LoRA factors"):
            reader(folder)


def test_two_adapter_names_are_refused_naming_both(tmp_path: Path) -> None:
    """`default` on q_proj and `other` on v_proj used to be read as one adapter."""
    folder = write_lora_adapter(tmp_path / "a", SHAPES, r=4, adapter_name="default")
    a = "base_model.model.layers.0.v_proj.lora_A.default.weight"
    b = "base_model.model.layers.0.v_proj.lora_B.default.weight"
    _add_tensors(
        folder,
        {
            a.replace("default", "other"): torch.ones(4, 6),
            b.replace("default", "other"): torch.ones(8, 4),
        },
        drop=(a, b),
    )
    for reader in (LoraAdapter.open, read_peft_adapter):
        with pytest.raises(SourceError, match="more than one adapter") as err:
            reader(folder)
        assert "'default'" in str(err.value) and "'other'" in str(err.value), str(err.value)
