"""Fuzzing `model.safetensors.index.json` (and a hostile `config.json` beside it).

A real two-shard Llama-like folder sits next to a valid safetensors file *outside* it; mutated
indexes point at that file (`../`, absolute paths, drive letters, UNC paths, backslashes), at
missing shards, or are of the wrong types. Every case ends in a `SourceError` or in the same
tensors as the untouched folder, and no file outside the folder is ever opened (audit hook).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from _fuzz_helpers import FUZZ, ReadGuard, bounded_alloc, expect_spectra_error_or, hostile_text
from _source_fixtures import write_llama_like, write_safetensors
from hypothesis import given
from hypothesis import strategies as st

from spectra.errors import SourceError, SpectraError
from spectra.sources.checkpoint import Checkpoint

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], list[str]]:
    root = tmp_path_factory.mktemp("idx")
    folder = write_llama_like(root / "model", layers=1, hidden=8, intermediate=16, vocab=10)
    import torch

    write_safetensors(root / "evil.safetensors", {"secret.weight": torch.ones(2, 2)})
    index = json.loads((folder / INDEX).read_text())
    with Checkpoint.open(folder) as ckpt:
        names = [t.name for t in ckpt.tensors()]
    return folder, index, names


def outside_targets(folder: Path) -> list[str]:
    evil = folder.parent / "evil.safetensors"
    return [
        "../evil.safetensors",
        "./../evil.safetensors",
        "sub/../../evil.safetensors",
        "..\\evil.safetensors",
        str(evil),
        "/etc/passwd.safetensors",
        "C:\\evil.safetensors",
        "C:evil.safetensors",
        "\\\\server\\share\\evil.safetensors",
        "//server/share/evil.safetensors",
        "~/evil.safetensors",
        "",
        ".",
        "model.safetensors\x00.txt",
        "missing-00009.safetensors",
        "config.json",
    ]


def run_case(folder: Path, names: list[str]) -> object:
    with ReadGuard.armed(folder) as outside, bounded_alloc(16 << 20):
        result = expect_spectra_error_or(_open, folder)
    assert not outside, f"opened outside the checkpoint folder: {outside}"
    if isinstance(result, SpectraError):
        assert isinstance(result, SourceError)
        assert "\n" not in str(result) and len(str(result)) < 1000, str(result)
    else:
        assert result == names  # the shards named are the real ones: the same tensors
    return result


def _open(folder: Path) -> list[str]:
    with Checkpoint.open(folder) as ckpt:
        out = [t.name for t in ckpt.tensors()]
        for m in ckpt.matrices():
            ckpt.read(m)
        return out


def _fresh(tmp: Path, pristine_folder: Path) -> Path:
    folder = tmp / "model"
    shutil.copytree(pristine_folder, folder)
    return folder


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), hostile_text),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(
    data=st.data(),
    op=st.sampled_from(["retarget", "wrong_type", "weight_map", "add", "random", "drop_shard"]),
)
def test_mutated_index(
    tmp_path_factory: pytest.TempPathFactory,
    pristine: tuple[Path, dict[str, Any], list[str]],
    data: st.DataObject,
    op: str,
) -> None:
    src, index, names = pristine
    folder = _fresh(tmp_path_factory.mktemp("case"), src)
    obj: Any = json.loads(json.dumps(index))
    wm = obj["weight_map"]
    key = data.draw(st.sampled_from(sorted(wm)))
    if op == "retarget":
        wm[key] = data.draw(st.sampled_from(outside_targets(folder)))
    elif op == "wrong_type":
        wm[key] = data.draw(json_values.filter(lambda v: not isinstance(v, str)))
    elif op == "weight_map":
        obj["weight_map"] = data.draw(json_values)
    elif op == "add":
        wm[data.draw(hostile_text)] = data.draw(
            st.one_of(st.sampled_from(outside_targets(folder)), hostile_text)
        )
    elif op == "random":
        obj = data.draw(json_values)
    else:
        (folder / wm[key]).unlink()
    (folder / INDEX).write_text(json.dumps(obj))
    result = run_case(folder, names)
    if op in ("retarget", "drop_shard"):
        assert isinstance(result, SourceError)


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000, '{"weight_map": {"a": ' + "9" * 5000 + "}}", "\xff\xfe", "", "null"],
    ids=["deep", "long-int", "not-utf8", "empty", "null"],
)
def test_unparsable_index(
    tmp_path: Path, pristine: tuple[Path, dict[str, Any], list[str]], text: str
) -> None:
    folder = _fresh(tmp_path, pristine[0])
    (folder / INDEX).write_bytes(text.encode("utf-8", "surrogateescape"))
    result = run_case(folder, pristine[2])
    assert isinstance(result, SourceError)
    assert INDEX in str(result)


@pytest.mark.parametrize("target", range(16))
def test_every_outside_target_refused_unread(
    tmp_path: Path, pristine: tuple[Path, dict[str, Any], list[str]], target: int
) -> None:
    src, index, names = pristine
    folder = _fresh(tmp_path, src)
    rel = outside_targets(folder)[target]
    obj = json.loads(json.dumps(index))
    obj["weight_map"][names[0]] = rel
    (folder / INDEX).write_text(json.dumps(obj))
    result = run_case(folder, names)
    assert isinstance(result, SourceError)
    assert (
        "outside the checkpoint folder" in str(result)
        or "missing" in str(result)
        or ("not a .safetensors" in str(result))
    ), str(result)


@pytest.mark.parametrize(
    "config",
    ["[" * 100_000, '{"hidden_size": ' + "9" * 5000 + "}", '{"hidden_size": true}', "[]", "\xff"],
    ids=["deep", "long-int", "bool", "list", "not-utf8"],
)
def test_hostile_config_json_is_ignored(
    tmp_path: Path, pristine: tuple[Path, dict[str, Any], list[str]], config: str
) -> None:
    folder = _fresh(tmp_path, pristine[0])
    (folder / "config.json").write_bytes(config.encode("utf-8", "surrogateescape"))
    assert run_case(folder, pristine[2]) == pristine[2]


def test_read_guard_sees_an_outside_open(
    pristine: tuple[Path, dict[str, Any], list[str]],
) -> None:
    """Negative control: the guard used above does record a read outside the folder."""
    folder = pristine[0]
    with ReadGuard.armed(folder) as outside:
        (folder / INDEX).read_bytes()
        assert outside == []
        (folder.parent / "evil.safetensors").read_bytes()
    assert outside == [str((folder.parent / "evil.safetensors").resolve())]
