"""Outputs cached with their spectra: plot PNGs and whole analyses (issue 19).

A rerun whose inputs are unchanged serves the same bytes without drawing (no matplotlib) or
computing (no torch); any change to an input, an option or the code that makes the output
misses. Checked on a hand-made Analysis and on a tiny checkpoint through the real command.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from _report_fixtures import make_analysis
from _source_fixtures import write_llama_like
from typer.testing import CliRunner

from spectra.analysis.results import Analysis, SkippedMatrix
from spectra.blobcache import BlobCache, blob_key, code_digest
from spectra.cli.main import app
from spectra.errors import ValidationError
from spectra.jobs import report_cache as RC
from spectra.reports import plots as P
from spectra.reports import report as R

HEAVY = ("torch", "matplotlib", "scipy")


# ------------------------------------------------------------------ the blob store


def test_blob_round_trip_and_corruption_is_a_miss(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, "plots")
    key = blob_key("x", 1, b"\x00\x01")
    assert cache.get(key) is None
    cache.put(key, b"png bytes")
    assert cache.get(key) == b"png bytes"
    [path] = (tmp_path / "blobs" / "v1" / "plots").rglob("*.bin")
    path.write_bytes(path.read_bytes()[:-1] + b"X")  # one flipped byte
    assert cache.get(key) is None
    assert not path.exists()  # removed: the next writer stores a good one
    with pytest.raises(ValidationError, match="64 hex"):
        cache.get("../../etc/passwd")
    with pytest.raises(ValidationError, match="namespace"):
        BlobCache(tmp_path, "../x")


def test_blob_key_separates_parts_and_types() -> None:
    assert blob_key("ab", "c") != blob_key("a", "bc")
    assert blob_key(b"1") != blob_key("1") != blob_key(1)
    assert blob_key({"a": 1, "b": 2}) == blob_key({"b": 2, "a": 1})
    assert blob_key(float("nan")) != blob_key(None)


def test_code_digest_follows_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pkg_dig").mkdir()
    mod = tmp_path / "pkg_dig" / "__init__.py"
    mod.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = code_digest.__wrapped__("pkg_dig")
    mod.write_text("X = 2\n")
    assert code_digest.__wrapped__("pkg_dig") != before


# ------------------------------------------------------------------ plots


def test_cached_plots_are_the_drawn_bytes_and_draw_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    analysis = make_analysis(1)
    cache = BlobCache(tmp_path, "plots")
    cold = R.render_plots(analysis, cache=cache)
    assert cold.files() == R.render_plots(analysis).files()  # the cache changes no byte

    def no_drawing(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached plot was drawn again")

    for name in ("esd_plot", "alpha_by_depth", "norms_by_depth", "sv_decay", "outlier_heatmap"):
        monkeypatch.setattr(P, name, no_drawing)
    assert R.render_plots(analysis, cache=cache).files() == cold.files()


def test_a_changed_matrix_redraws_its_plots_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    analysis = make_analysis(1)
    cache = BlobCache(tmp_path, "plots")
    R.render_plots(analysis, cache=cache)
    changed = analysis.layers[3]
    layers = [replace(lm, alpha=lm.alpha + 0.5) if lm is changed else lm for lm in analysis.layers]
    edited = replace(analysis, layers=layers)
    drawn: list[str] = []
    real_esd = P.esd_plot
    monkeypatch.setattr(
        P, "esd_plot", lambda lam, lm, c=None: drawn.append(lm.key) or real_esd(lam, lm, c)
    )
    for name in ("alpha_by_depth", "norms_by_depth", "sv_decay", "outlier_heatmap"):
        real = getattr(P, name)
        monkeypatch.setattr(P, name, lambda *a, _n=name, _r=real: drawn.append(_n) or _r(*a))
    out = R.render_plots(edited, cache=cache)
    # the model-level plots show every matrix's metrics, so they are redrawn too
    assert sorted(drawn) == sorted(
        [changed.key, "alpha_by_depth", "norms_by_depth", "sv_decay", "outlier_heatmap"]
    )
    assert out.files() == R.render_plots(edited).files()


# ------------------------------------------------------------------ the analysis blob


def test_analysis_blob_round_trip_is_exact() -> None:
    analysis = make_analysis(1)
    layers = list(analysis.layers)
    layers[0] = replace(layers[0], alpha=float("inf"), D=float("nan"))  # kept, unlike JSON
    skipped = [SkippedMatrix("emb.weight", (2, 384), "min(m, n) = 2 < min_evals = 8")]
    summary = replace(analysis.summary, means={"alpha": 3.5, "mp_softrank": 0.25})
    analysis = replace(analysis, layers=layers, skipped=skipped, summary=summary)
    back = RC.decode_analysis(RC.encode_analysis(analysis))
    assert back.skipped == skipped and back.summary.means == summary.means
    assert back.source == analysis.source and back.options == analysis.options
    assert back.versions == analysis.versions and back.summary == analysis.summary
    assert back.layers[1:] == analysis.layers[1:]
    assert back.layers[0].alpha == math.inf and math.isnan(back.layers[0].D)
    assert list(back.esds) == list(analysis.esds)
    for key, lam in analysis.esds.items():
        assert back.esds[key].dtype == np.float64
        assert np.array_equal(back.esds[key], lam)


@pytest.mark.parametrize("cut", [1, 9])
def test_a_malformed_analysis_blob_is_a_miss(tmp_path: Path, cut: int) -> None:
    blob = RC.encode_analysis(make_analysis(1))
    cache = RC.AnalysisCache(tmp_path)
    key = blob_key("k")
    cache.blobs.put(key, blob[:-cut])  # checksummed as written: only the decoder can tell
    assert cache.get(key) is None


def test_analysis_key_follows_files_options_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "m.safetensors"
    src.write_bytes(b"0" * 64)
    base = RC.analysis_key(src, {"roles": None})
    assert base is not None and base == RC.analysis_key(src, {"roles": None})
    assert RC.analysis_key(src, {"roles": "q"}) != base
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert RC.analysis_key(src, {"roles": None}) != base
    monkeypatch.delenv("OMP_NUM_THREADS")
    os.utime(src, ns=(1, 1))  # same bytes, new identity: trusted no longer
    assert RC.analysis_key(src, {"roles": None}) not in (None, base)
    assert RC.analysis_key(tmp_path / "absent", {}) is None
    assert RC.analysis_key(Path("org/name"), {}) is None  # a Hub id: never served from here
    assert RC.under_torchrun({"WORLD_SIZE": "2"}) and not RC.under_torchrun({})


def test_a_folder_key_covers_every_shard_and_json(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.safetensors", "sub/b.safetensors", "config.json", "README.md"):
        (folder / name).write_text(name)
    assert [p.relative_to(folder).as_posix() for p in RC.input_files(folder)] == [
        "a.safetensors",
        "config.json",
        "sub/b.safetensors",
    ]
    before = RC.analysis_key(folder, {})
    (folder / "sub" / "b.safetensors").write_text("changed")
    assert RC.analysis_key(folder, {}) != before


# ------------------------------------------------------------------ the command


def _report(*args: str) -> None:
    result = CliRunner().invoke(app, ["report", *args, "--quiet"])
    assert result.exit_code == 0, result.output


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


_RERUN = """
import sys
from spectra.cli.main import app
try:
    app(sys.argv[1:])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
print("HEAVY", sorted(m for m in sys.modules if m.split(".")[0] in {heavy}))
"""


def test_cached_rerun_writes_the_same_report_without_torch(tmp_path: Path) -> None:
    src = write_llama_like(tmp_path / "ckpt", layers=1, hidden=32, intermediate=48, vocab=40)
    cache = tmp_path / "cache"
    common = ["--cache-dir", str(cache), "--roles", "q,k,up"]
    _report(str(src), "--out", str(tmp_path / "cold"), *common)
    code = _RERUN.format(heavy=set(HEAVY))
    argv = ["report", str(src), "--out", str(tmp_path / "warm"), *common, "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout  # neither computed nor drawn
    assert _files(tmp_path / "warm") == _files(tmp_path / "cold")
    # changed shards are recomputed: the report then says what the new bytes say
    write_llama_like(src, layers=1, hidden=32, intermediate=48, vocab=40, seed=1)
    _report(str(src), "--out", str(tmp_path / "changed"), *common)
    old = Analysis.from_json(tmp_path / "cold" / "metrics.json").layers
    new = Analysis.from_json(tmp_path / "changed" / "metrics.json").layers
    assert [lm.key for lm in new] == [lm.key for lm in old]
    assert all(a.log_norm != b.log_norm for a, b in zip(new, old, strict=True))
