"""`compare BASE ADAPTER --roles/--include/--exclude` selects among the adapter's modules too
(issue 14, case 11: it always failed with "the adapter targets N matrices the base does not
have")."""

from __future__ import annotations

from pathlib import Path

import pytest
from _adapt_fixtures import one_thread  # noqa: F401 (module-wide, one torch thread)
from _compare_fixtures import Q0, V1, lora_and_merged
from typer.testing import CliRunner

from spectra.analysis.comparison import CompareOptions
from spectra.cli.main import app
from spectra.errors import ValidationError
from spectra.jobs.compare import compare


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return lora_and_merged(tmp_path_factory.mktemp("sel"))


@pytest.mark.parametrize(
    ("select", "keys"),
    [
        ({"roles": ("q",)}, [Q0]),
        ({"roles": ("v",)}, [V1]),
        ({"include": ("*layers.1.*",)}, [V1]),
        ({"exclude": ("*v_proj*",)}, [Q0]),
        ({}, [Q0, V1]),
    ],
)
def test_selection_applies_to_the_adapter(
    folders: tuple[Path, Path, Path], select: dict, keys: list[str]
) -> None:
    base, adapter, merged = folders
    opts = CompareOptions(device="cpu", **select)
    cmp = compare(base, adapter, opts)
    assert cmp is not None
    assert [p.key for p in cmp.pairs] == keys
    # the same numbers as the merged checkpoint compared with the same selection
    full = compare(base, merged, CompareOptions(device="cpu", allow_missing=True, **select))
    assert full is not None
    by_key = {p.key: p for p in full.pairs}
    for p in cmp.pairs:
        assert p.update.rel_change == pytest.approx(by_key[p.key].update.rel_change, rel=1e-5)


def test_a_selection_without_adapted_matrices_says_so(folders: tuple[Path, Path, Path]) -> None:
    base, adapter, _ = folders
    with pytest.raises(ValidationError, match="adapts none of the selected.*--roles"):
        compare(base, adapter, CompareOptions(device="cpu", roles=("down",)))


def test_cli_roles_with_an_adapter(folders: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, adapter, _ = folders
    res = CliRunner().invoke(
        app, ["compare", str(base), str(adapter), "--roles", "q", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 0, res.output
    assert "does not have" not in res.output
