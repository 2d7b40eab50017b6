"""Fuzzing PEFT `adapter_config.json`: wrong types, zero/negative/huge r, alpha 0, NaN, bad or
exponential regexes in rank_pattern/alpha_pattern. Each case is a `SourceError` naming the field,
or a correct adapter (its scale equals alpha / r, or alpha / sqrt(r) with rsLoRA)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from _fuzz_helpers import FUZZ, ReadGuard, expect_spectra_error_or, hostile_text
from _source_fixtures import write_lora_adapter
from hypothesis import given
from hypothesis import strategies as st

from spectra.errors import SourceError, SpectraError
from spectra.formats.peft import check_pattern
from spectra.sources.adapters import LoraAdapter

SHAPES = {"layers.0.q_proj.weight": (8, 6), "layers.0.v_proj.weight": (8, 6)}
RANK = 4


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lora_adapter(tmp_path_factory.mktemp("lora") / "a", SHAPES, r=RANK, alpha=8)


def _open(folder: Path, config: Any) -> LoraAdapter | SpectraError:
    (folder / "adapter_config.json").write_text(json.dumps(config, allow_nan=True))
    with ReadGuard.armed(folder) as outside:
        result = expect_spectra_error_or(LoraAdapter.open, folder)
    assert not outside, outside
    if isinstance(result, SpectraError):
        assert isinstance(result, SourceError)
        assert "\n" not in str(result) and len(str(result)) < 1500, str(result)
    return result


def _check_correct(adapter: LoraAdapter, config: dict[str, Any]) -> None:
    """Scale and rank as PEFT defines them; factors readable with the stated shapes."""
    for mod in adapter.modules.values():
        assert mod.rank == RANK
        alpha = mod.alpha
        want = alpha / math.sqrt(RANK) if config.get("use_rslora") is True else alpha / RANK
        assert mod.scale == pytest.approx(want, rel=1e-12)
        a, b, _ = adapter.read_factors(mod)
        assert a.shape == (RANK, 6) and b.shape == (8, RANK)


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10),
    st.sampled_from([0, RANK, 2**31, 2**63, 10**30]),
    st.floats(),
    hostile_text,
    st.lists(st.integers(), max_size=2),
    st.dictionaries(hostile_text, st.integers(), max_size=2),
)
patterns = st.one_of(
    st.sampled_from(
        [
            "q_proj",
            "layers.0.q_proj",
            ".*v_proj",
            "(",
            "[",
            "(a+)+",
            "(q|v)*_proj",
            "*",
            "\\",
            "(?P<x>",
            "a{99999999999}",
            "(.*)*",
            "x" * 2000,
        ]
    ),
    hostile_text,
)


@FUZZ
@given(
    field=st.sampled_from(
        ["r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "peft_type", "whole"]
    ),
    value=values,
    pattern=patterns,
    data=st.data(),
)
def test_mutated_config(
    tmp_path_factory: pytest.TempPathFactory,
    adapter_dir: Path,
    field: str,
    value: Any,
    pattern: str,
    data: st.DataObject,
) -> None:
    import shutil

    folder = tmp_path_factory.mktemp("c") / "a"
    shutil.copytree(adapter_dir, folder)
    config: Any = json.loads((adapter_dir / "adapter_config.json").read_text())
    if field in ("rank_pattern", "alpha_pattern"):
        config[field] = data.draw(st.one_of(st.just({pattern: value}), values))
    elif field == "whole":
        config = value
    else:
        config[field] = value
    t0 = time.perf_counter()
    result = _open(folder, config)
    assert time.perf_counter() - t0 < 5, "adapter config took too long (regex backtracking?)"
    if isinstance(result, LoraAdapter):
        _check_correct(result, config)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("r", 0, "r must be a positive integer"),
        ("r", -4, "r must be a positive integer"),
        ("r", 10**12, "rank 4 but the config says 1000000000000"),
        ("r", "4", "positive integer"),
        ("r", 4.0, "positive integer"),
        ("r", True, "positive integer"),
        ("lora_alpha", "8", "finite number"),
        ("lora_alpha", float("nan"), "finite number"),
        ("lora_alpha", None, "finite number"),
        # issue 14: 1e308 overflowed the update (and convert's doubled alpha) to inf; an int of
        # 400 digits raised OverflowError in math.isfinite; r past int64 as well
        ("lora_alpha", 1e308, "finite number between -1e+06 and 1e+06"),
        ("lora_alpha", -(10**400), "finite number between"),
        ("r", 10**30, "positive integer up to"),
        ("alpha_pattern", {"q_proj": 1e300}, "finite number between"),
        ("use_rslora", "false", "true or false"),
        ("rank_pattern", ["q_proj"], "must map"),
        ("rank_pattern", {"q_proj": 0}, "positive integer"),
        ("rank_pattern", {"(": 4}, "not a valid regular expression"),
        ("rank_pattern", {"(a+)+$": 4}, "exponential"),
        ("alpha_pattern", {"(xy|y)*": 2}, "exponential"),
        ("alpha_pattern", {"q_proj": "2"}, "finite number"),
    ],
)
def test_bad_fields(adapter_dir: Path, tmp_path: Path, field: str, value: Any, words: str) -> None:
    import shutil

    folder = tmp_path / "a"
    shutil.copytree(adapter_dir, folder)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config[field] = value
    result = _open(folder, config)
    assert isinstance(result, SourceError), result
    assert words in str(result), str(result)
    assert field in str(result) or "rank 4" in str(result)


def test_alpha_zero_is_a_correct_zero_update(adapter_dir: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "a"
    shutil.copytree(adapter_dir, folder)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["lora_alpha"] = 0
    adapter = _open(folder, config)
    assert isinstance(adapter, LoraAdapter)
    for mod in adapter.modules.values():
        assert mod.scale == 0.0
        assert float(adapter.delta(mod).abs().max()) == 0.0


@pytest.mark.parametrize("text", ["[" * 100_000, '{"r": ' + "9" * 5000 + "}", "[]", "7"])
def test_unparsable_config(adapter_dir: Path, tmp_path: Path, text: str) -> None:
    import shutil

    folder = tmp_path / "a"
    shutil.copytree(adapter_dir, folder)
    (folder / "adapter_config.json").write_text(text)
    with pytest.raises(SourceError, match="adapter"):
        LoraAdapter.open(folder)


@pytest.mark.parametrize(
    "ok", ["q_proj", "layers\\.0\\.q_proj", ".*\\.q_proj", "model.layers.(0|1).q"]
)
def test_ordinary_patterns_are_accepted(ok: str) -> None:
    check_pattern(ok, "rank_pattern")


def test_exponential_pattern_really_is_slow_without_the_check() -> None:
    """Negative control: the refused pattern does backtrack exponentially under `re`."""
    import re

    t0 = time.perf_counter()
    re.match(r"(.*\.)?((a+)+)$", "a" * 22 + "!")
    assert time.perf_counter() - t0 > 0.05
