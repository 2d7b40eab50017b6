"""`spectra compare` end to end: files written, numbers equal the library's, errors, escaping,
and compare.html in headless Chromium."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from _adapt_fixtures import one_thread  # noqa: F401 (module-wide, one torch thread)
from _browser import browser_unavailable, render_in_chromium
from _compare_fixtures import Q0, V1, D, base_and_ft, lora_and_merged, save
from typer.testing import CliRunner

from spectra.analysis.comparison import CompareOptions
from spectra.cli.main import app
from spectra.jobs.compare import compare

EVIL = "evil.<img src=x onerror=alert(1)>$x$|[b]"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base, ft, _ = base_and_ft()
    g = torch.Generator().manual_seed(9)
    base[EVIL + ".weight"] = torch.randn(D, D, generator=g, dtype=torch.float64)
    ft[EVIL + ".weight"] = base[EVIL + ".weight"] + 0.5 * torch.randn(
        D, 1, generator=g, dtype=torch.float64
    ) @ torch.randn(1, D, generator=g, dtype=torch.float64)
    root = tmp_path_factory.mktemp("cli")
    return save(root / "base", base), save(root / "ft", ft)


@pytest.fixture(scope="module")
def out(dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("o") / "cmp"
    res = CliRunner().invoke(
        app,
        ["compare", str(dirs[0]), str(dirs[1]), "--out", str(target), "--epsilon", "0.5,0.9"],
    )
    assert res.exit_code == 0, res.output
    assert "intruder" in res.output and "wrote" in res.output
    return target


def test_writes_every_file_with_the_library_numbers(out: Path, dirs: tuple[Path, Path]) -> None:
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"compare.html", "compare.md", "compare.json", "compare.csv"} <= names
    pngs = {n for n in names if n.startswith("plots/") and n.endswith(".png")}
    assert len(pngs) == 4
    data = json.loads((out / "compare.json").read_text())
    lib = compare(*dirs, CompareOptions(epsilons=(0.5, 0.9), device="cpu")).to_dict()
    assert data["pairs"] == lib["pairs"] and data["forensics"] == lib["forensics"]
    q0 = next(p for p in data["pairs"] if p["key"] == Q0)
    assert q0["intruders"]["counts"] == {"0.5": 1, "0.9": 1}
    rows = list(csv.DictReader(io.StringIO((out / "compare.csv").read_text())))
    assert len(rows) == len(data["pairs"]) == 6
    assert {r["key"] for r in rows} >= {Q0, V1, EVIL + ".weight"}
    assert next(r for r in rows if r["key"] == V1)["kind"] == "unchanged"


def test_names_are_escaped_in_html_and_markdown(out: Path) -> None:
    page = (out / "compare.html").read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    md = (out / "compare.md").read_text()
    assert "<img src=x" not in md


def test_refuses_to_overwrite_and_reports_pairing_errors(
    out: Path, dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["compare", str(dirs[0]), str(dirs[1]), "--out", str(out)])
    assert res.exit_code == 2 and "--force" in res.output
    base, ft, _ = base_and_ft()
    other = save(tmp_path / "other", {"x." + k: v for k, v in ft.items()})
    res = runner.invoke(app, ["compare", str(dirs[0]), str(other), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "only in fine-tune" in res.output and "--map" in res.output
    assert not (tmp_path / "o").exists()
    res = runner.invoke(
        app, ["compare", str(dirs[0]), str(dirs[1]), "--out", str(tmp_path / "e"), "--epsilon", "x"]
    )
    assert res.exit_code == 2 and "'x'" in res.output


def test_lora_adapter_folder_via_cli(tmp_path: Path) -> None:
    base, adapter, _ = lora_and_merged(tmp_path)
    res = CliRunner().invoke(
        app,
        [
            "compare",
            str(base),
            str(adapter),
            "--out",
            str(tmp_path / "o"),
            "--k",
            "5",
            "--cache-dir",
            str(tmp_path / "c"),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert data["mode"] == "lora" and data["forensics"]["apparent_rank"] == 4
    assert all(p["intruders"]["k"] == 5 for p in data["pairs"])
    assert any((tmp_path / "c").rglob("*.safetensors"))  # the base SVDs were cached


REASON = browser_unavailable()


@pytest.mark.browser
@pytest.mark.skipif(REASON is not None, reason=str(REASON))
def test_compare_html_renders_cleanly_in_chromium(out: Path) -> None:
    result = render_in_chromium(out / "compare.html")
    assert result.console_errors == [] and result.page_errors == [] and result.dialogs == []
    assert result.requests == [] and result.script_elements == 0
    assert EVIL + ".weight" in result.text
    assert {"verdicts", "plots", "pairs", "defs"} <= set(result.ids)
    assert len(result.images) == 4 and all(w > 0 for _, w in result.images)
