"""SIGKILL of a real `spectra report` process at seeded event points of its work.

One complete run (its own cache) is the reference; it also records the run's events: every cache
file committed, every file written into the temp output folder, the folder swapped into place
(tests/_kill_points.py). Then the same command, with a shared cache and the same output folder,
is killed 4 times, each exactly at an event (the child pauses there and is killed, so where the
kill lands does not depend on the machine's speed or load): at a seeded event in the first half
of the run; before a seeded cache commit (a payload or its entry: mid spectra pass); before a
seeded file of the temp output folder (mid write); and before a seeded file or folder rename of
a `--force` replacement of an earlier complete output. After each kill the output folder is
absent or complete (the reference's file list, parseable JSON with the reference's numbers), and
only siblings of the dead process are left. A last run then succeeds, serves the entries the
killed runs had committed (their files are not rewritten), prints no cache-corruption report, and
every cache entry equals a fresh float64 computation.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from _kill_points import SPECTRA_MAIN, run_to_event
from _source_fixtures import write_llama_like

from spectra.linalg.cache import CACHE_FORMAT, CacheCorruptionWarning, SpectrumCache
from spectra.linalg.engine import EngineOptions, compute_spectra
from spectra.sources.checkpoint import Checkpoint

REPO = Path(__file__).resolve().parents[1]


def _args(ckpt: Path, out: Path, cache: Path) -> list[str]:
    return [
        "report",
        str(ckpt),
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        "--device",
        "cpu",
        "--force",
        "-q",
    ]


def _env() -> dict[str, str]:
    # one BLAS thread: same numbers in every run (docs/architecture.md, reproducibility)
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    return {**os.environ, "PYTHONPATH": str(REPO), **threads}


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _metrics(folder: Path) -> dict[str, dict[str, Any]]:
    doc = json.loads((folder / "metrics.json").read_text())
    return {lm["key"]: lm for lm in doc["layers"]}


def _same_numbers(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> bool:
    if a.keys() != b.keys():
        return False
    for key, lm in a.items():
        for metric in ("alpha", "log_norm", "stable_rank", "numerical_rank", "outlier_ratio"):
            x, y = lm[metric], b[key][metric]
            if (x is None) != (y is None) or (x is not None and abs(x - y) > 1e-9 * abs(x)):
                return False
    return True


def _entries(cache: Path) -> dict[str, int]:
    """Committed cache entries (name -> mtime): not the `.tmp-*` files a killed run left (pathlib's
    `*` matches dot-files), nor entries that vanish between glob and stat."""
    out: dict[str, int] = {}
    for p in cache.glob(f"v{CACHE_FORMAT}/entries/*/*.json"):
        if p.name.startswith("."):
            continue
        try:
            out[p.name] = p.stat().st_mtime_ns
        except FileNotFoundError:
            continue
    return out


def _command(ckpt: Path, out: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "spectra", *_args(ckpt, out, cache)]


def test_sigkilled_report_leaves_no_partial_output_and_no_bad_cache(tmp_path: Path) -> None:
    ckpt = write_llama_like(tmp_path / "ck", layers=3, hidden=96, intermediate=192, vocab=160)
    ref_out, ref_cache = tmp_path / "ref", tmp_path / "ref-cache"
    ref = run_to_event(SPECTRA_MAIN, _args(ckpt, ref_out, ref_cache), "record", _env(), ref_cache)
    ref_files, ref_metrics = _files(ref_out), _metrics(ref_out)
    assert "metrics.json" in ref_files and "report.html" in ref_files
    kinds = [line.split()[0] for line in ref.lines]
    assert kinds.count("cache") >= 2 * len(ref_metrics) and kinds[-1] == "swap", ref.lines
    n_out = kinds.count("out")  # every file of the folder, written into its temp sibling

    out, cache = tmp_path / "out", tmp_path / "cache"
    rng = random.Random(2024)
    for it in range(4):
        if it == 0:  # anywhere in the first half of the run (the same events as the reference)
            at = f"any:{rng.randrange(len(kinds) // 2)}"
        elif it == 1:  # before a cache payload or entry commit the earlier kill left to do
            remaining = len(ref_metrics) - len(_entries(cache))
            assert remaining > 0, "the first kill must land in the spectra pass"
            at = f"cache:{rng.randrange(2 * remaining)}"
        elif it == 2:  # mid write of the output folder
            at = f"out:{rng.randrange(n_out)}"
        else:  # mid write or between the renames of a --force replacement of a complete output
            if not out.exists():
                shutil.copytree(ref_out, out)
            step = rng.randrange(n_out + 2)  # out files, then swap 0 (old away), swap 1 (new in)
            at = f"out:{step}" if step < n_out else f"swap:{step - n_out}"
        run = run_to_event(SPECTRA_MAIN, _args(ckpt, out, cache), at, _env(), cache)
        assert run.killed, f"kill {it} at {at}: the run ended first ({run.lines})"
        if out.exists():
            assert _files(out) == ref_files, f"kill {it} ({run.lines[-1]}): partial output folder"
            assert _same_numbers(_metrics(out), ref_metrics), f"kill {it}: wrong numbers"
        left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
        assert all(f"-{run.pid}" in n for n in left), (it, left)  # only the dead run's

    before = _entries(cache)
    final = subprocess.run(_command(ckpt, out, cache), env=_env(), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert "corrupted spectrum cache entry" not in final.stderr
    assert _files(out) == ref_files and _same_numbers(_metrics(out), ref_metrics)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    after = _entries(cache)
    assert all(after[name] == mtime for name, mtime in before.items()), "entries were rewritten"
    assert len(after) == len(ref_metrics)

    # every committed entry is exactly a fresh computation (float64 Gram route)
    torch.set_num_threads(1)
    with Checkpoint.open(str(ckpt)) as ck, warnings.catch_warnings():
        warnings.simplefilter("error", CacheCorruptionWarning)
        cached = list(
            compute_spectra(ck, engine=EngineOptions(device="cpu"), cache=SpectrumCache(cache))
        )
        fresh = list(compute_spectra(ck, engine=EngineOptions(device="cpu"), cache=None))
    assert all(s.from_cache for s in cached)
    for a, b in zip(cached, fresh, strict=True):
        assert a.key == b.key and torch.allclose(a.values, b.values, rtol=1e-9, atol=1e-12)
