"""A mistyped local path is "no such file or folder", never a Hub lookup (issue 14, case 13:
`spectra report models/nope` ended in `internal error: ConnectError`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import spectra.sources.checkpoint as checkpoint
from spectra.cli.main import app
from spectra.errors import SourceError
from spectra.sources.checkpoint import Checkpoint, is_hub_source


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a Hub lookup for {args}")

    monkeypatch.setattr(checkpoint, "repo_shards", refuse)


@pytest.mark.parametrize(
    "text",
    ["models/nope", "./org/name", "../org/name", "/org/name", "~/org", "a/b/c", "a/b/c@main"],
)
def test_mistyped_local_paths_are_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_hub: None, text: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert not is_hub_source(text)
    with pytest.raises(SourceError, match="no such file or folder"):
        Checkpoint.open(text)


def test_repo_ids_still_go_to_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for text in ("org/name", "HuggingFaceTB/SmolLM2-135M", "org/name@refs/pr/1"):
        assert is_hub_source(text), text
    assert not is_hub_source("model.safetensors")
    (tmp_path / "org").mkdir()  # now `org/name` reads as a path inside the local org/ folder
    assert not is_hub_source("org/name")


def test_cli_says_no_such_file_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_hub: None
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    res = CliRunner().invoke(app, ["report", "models/nope", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert "models/nope: no such file or folder" in res.output
    assert "internal error" not in res.output
