"""`spectra report` on the real MiniLM via CliRunner: files, numbers, overwrite rules, errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spectra.analysis.results import Analysis
from spectra.cli.main import app
from spectra.cli.report_cmd import ReportProgress
from spectra.jobs.report import analyze
from spectra.outdir import MARKER


def run(*args: str) -> object:
    return CliRunner().invoke(app, ["report", *args])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spectra-cache")


@pytest.fixture(scope="module")
def full_report(
    minilm_path: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The default report (all formats, all ESD plots), as `make demo` writes it."""
    out = tmp_path_factory.mktemp("cli") / "report"
    result = run(str(minilm_path), "--out", str(out), "--cache-dir", str(cache_dir))
    assert result.exit_code == 0, result.output
    assert f"wrote {len(list(out.rglob('*.*'))) - 1} files" in result.output  # minus the marker
    return out


def test_writes_every_file(full_report: Path) -> None:
    data = json.loads((full_report / "metrics.json").read_text())
    keys = [layer["key"] for layer in data["layers"]]
    assert len(keys) >= 37  # MiniLM: 6 blocks x 6 linear + embeddings + pooler
    for name in ("report.html", "report.md", "metrics.csv", MARKER):
        assert (full_report / name).is_file()
    plots = sorted(p.name for p in (full_report / "plots").glob("*.png"))
    assert len([p for p in plots if p.startswith("esd-")]) == len(keys)
    for stem in ("alpha_by_depth", "norms_by_depth", "sv_decay", "outlier_heatmap"):
        assert f"{stem}.png" in plots
    html = (full_report / "report.html").read_text()
    assert (full_report / "report.html").stat().st_size < 5_000_000
    assert all(key in html for key in keys)
    md = (full_report / "report.md").read_text()
    assert "## Model summary" in md and "## Warned layers" in md


def test_json_and_csv_equal_the_library_numbers(
    full_report: Path, minilm_path: Path, cache_dir: Path
) -> None:
    reference = analyze(minilm_path, cache=cache_dir)
    data = json.loads((full_report / "metrics.json").read_text())
    assert data["layers"] == reference.to_dict()["layers"]
    assert data["summary"] == reference.to_dict()["summary"]
    assert Analysis.from_json(full_report / "metrics.json").layers == reference.layers
    with open(full_report / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["key"] for r in rows] == [lm.key for lm in reference.layers]
    for row, lm in zip(rows, reference.layers, strict=True):
        if lm.alpha is None:
            assert row["alpha"] == ""
        else:
            assert float(row["alpha"]) == lm.alpha  # repr round trip: exact
        assert int(row["num_evals"]) == lm.num_evals
    # Alphas are real fits, not placeholders.
    alphas = [lm.alpha for lm in reference.layers if lm.alpha is not None]
    assert len(set(alphas)) > len(alphas) // 2 and all(math.isfinite(a) for a in alphas)


def test_refuses_to_overwrite_without_force(
    full_report: Path, minilm_path: Path, cache_dir: Path
) -> None:
    before = {p: p.stat().st_mtime_ns for p in full_report.rglob("*")}
    result = run(str(minilm_path), "--out", str(full_report), "--cache-dir", str(cache_dir))
    assert result.exit_code == 2
    assert "--force" in result.output and len(result.output.strip().splitlines()) == 1
    assert {p: p.stat().st_mtime_ns for p in full_report.rglob("*")} == before


def test_force_replaces_with_only_the_asked_formats(
    minilm_path: Path, cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r"
    args = [str(minilm_path), "--out", str(out), "--cache-dir", str(cache_dir), "--quiet"]
    assert run(*args, "--format", "json", "--roles", "q,k").exit_code == 0
    result = run(*args, "--format", "csv,json", "--roles", "q", "--force")
    assert result.exit_code == 0, result.output
    assert result.output == ""  # --quiet
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "metrics.csv", "metrics.json"])
    layers = json.loads((out / "metrics.json").read_text())["layers"]
    assert {layer["role"] for layer in layers} == {"q"} and len(layers) == 6


def test_refuses_a_foreign_non_empty_folder(minilm_path: Path, tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("precious")
    result = run(str(minilm_path), "--out", str(tmp_path), "--no-cache")
    assert result.exit_code == 2 and "not empty" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]


def test_default_source_is_the_bundled_model(minilm_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    result = run("--out", str(out), "--no-cache", "--format", "json", "--include", "*.0.*query*")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "metrics.json").read_text())
    assert Path(data["source"]).resolve() == minilm_path.resolve()
    assert [layer["key"] for layer in data["layers"]] == [
        "encoder.layer.0.attention.self.query.weight"
    ]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--format", "html,pdf"], "pdf"),
        (["--no-cache", "--cache-dir", "/tmp/x"], "--no-cache"),
        (["--max-esd-plots", "-1"], "-1"),
        (["--roles", "nonsense"], "nonsense"),
    ],
)
def test_bad_arguments_give_one_line(
    args: list[str], needle: str, minilm_path: Path, tmp_path: Path
) -> None:
    result = run(str(minilm_path), "--out", str(tmp_path / "r"), *args)
    assert result.exit_code == 2, result.output
    assert needle in result.output and result.output.startswith("error:")
    assert "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_missing_source(tmp_path: Path) -> None:
    result = run(str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "nope.safetensors" in result.output


def test_help_states_costs() -> None:
    result = CliRunner().invoke(app, ["report", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for option in ("--include", "--exclude", "--roles", "--device", "--no-cache", "--cache-dir"):
        assert option in text
    assert "extra spectrum per matrix" in text and "no extra SVD" in text


def test_progress_callback_feeds_the_bar() -> None:
    progress = ReportProgress(enabled=False)
    progress(3, 10, 5_000_000)
    task = progress.bar.tasks[0]
    assert (task.completed, task.total, task.fields["mb"]) == (3, 10, 5.0)
    progress(10, 10, 8_000_000)
    assert progress.bar.tasks[0].description == "metrics"
