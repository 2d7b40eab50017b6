"""SIGKILL of a real `spectra report` process at seeded random moments.

One complete run (its own cache) is the reference. Then the same command, with a shared cache
and the same output folder, is killed 4 times: at a seeded delay in the first half of the
reference's duration; when a seeded number of cache entries has been committed (mid spectra
pass); and twice a seeded few milliseconds after the temp output folder appears (mid write),
the second time over an earlier complete output (the `--force` swap). After each kill the
output folder is absent or complete (the reference's file list, parseable JSON with the
reference's numbers), and only `-tmp-` siblings of the dead process are left. A last run then
succeeds, serves the entries the killed runs had committed (their files are not rewritten),
prints no cache-corruption report, and every cache entry equals a fresh float64 computation.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _source_fixtures import write_llama_like

from spectra.linalg.cache import CACHE_FORMAT, CacheCorruptionWarning, SpectrumCache
from spectra.linalg.engine import EngineOptions, compute_spectra
from spectra.sources.checkpoint import Checkpoint

REPO = Path(__file__).resolve().parents[1]
KILLS = 4


def _command(ckpt: Path, out: Path, cache: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "spectra",
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


Trigger = Callable[[subprocess.Popen[bytes]], bool]


def _after(delay: float) -> Trigger:
    """Wait `delay` s; True when the process still runs then."""

    def wait(proc: subprocess.Popen[bytes]) -> bool:
        time.sleep(delay)
        return proc.poll() is None

    return wait


def _when(condition: Callable[[int], bool], delay: float = 0.0) -> Trigger:
    """Poll `condition(pid)` every ms while the process runs; True (kill it) once it holds."""

    def wait(proc: subprocess.Popen[bytes]) -> bool:
        while proc.poll() is None:
            if condition(proc.pid):
                time.sleep(delay)
                return proc.poll() is None
            time.sleep(0.001)
        return False

    return wait


def _writing(folder: Path, pid: int) -> bool:
    """Whether process `pid` has its temp output folder in `folder` (mid write)."""
    return any(folder.glob(f".out.spectra-tmp-{pid}-*"))


def _entries(cache: Path) -> dict[str, int]:
    """Committed cache entries (name -> mtime). Called while a run writes: skip its `.tmp-*`
    files (pathlib's `*` matches dot-files) and entries that vanish between glob and stat."""
    out: dict[str, int] = {}
    for p in cache.glob(f"v{CACHE_FORMAT}/entries/*/*.json"):
        if p.name.startswith("."):
            continue
        try:
            out[p.name] = p.stat().st_mtime_ns
        except FileNotFoundError:
            continue
    return out


@pytest.mark.timeout(150)
def test_sigkilled_report_leaves_no_partial_output_and_no_bad_cache(tmp_path: Path) -> None:
    ckpt = write_llama_like(tmp_path / "ck", layers=3, hidden=96, intermediate=192, vocab=160)
    ref_out = tmp_path / "ref"
    start = time.monotonic()
    done = subprocess.run(
        _command(ckpt, ref_out, tmp_path / "ref-cache"), env=_env(), capture_output=True, text=True
    )
    duration = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    ref_files, ref_metrics = _files(ref_out), _metrics(ref_out)
    assert "metrics.json" in ref_files and "report.html" in ref_files

    out, cache = tmp_path / "out", tmp_path / "cache"
    rng = random.Random(2024)
    target = rng.randint(1, len(ref_metrics) - 1)  # cache entries committed before the kill
    triggers = [
        _after(duration * rng.uniform(0.1, 0.5)),
        _when(lambda pid: len(_entries(cache)) >= target),
        _when(lambda pid: _writing(tmp_path, pid), rng.uniform(0, 0.004)),
        _when(lambda pid: _writing(tmp_path, pid), rng.uniform(0, 0.004)),
    ]
    killed = 0
    for it, trigger in enumerate(triggers):
        if it == 3 and not out.exists():
            shutil.copytree(ref_out, out)  # an earlier complete output to replace (--force)
        proc = subprocess.Popen(
            _command(ckpt, out, cache),
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if trigger(proc):
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
        proc.wait()
        if out.exists():
            assert _files(out) == ref_files, f"kill {it}: partial output folder"
            assert _same_numbers(_metrics(out), ref_metrics), f"kill {it}: wrong numbers"
        left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
        assert all(f"-{proc.pid}" in n for n in left), (it, left)  # only the dead run's
    assert killed >= 2, "the kills must land while spectra report runs"

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
