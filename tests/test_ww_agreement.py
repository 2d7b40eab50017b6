"""Agreement with WeightWatcher 0.7.x on the real all-MiniLM-L6-v2 (methods.md section 2).

WeightWatcher runs in a subprocess: importing it sets the root logger to INFO and silences all
warnings for the whole process, which would leak into other tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_powerlaw import reference_fit

from spectra.jobs.report import AnalyzeOptions, analyze
from spectra.sources.checkpoint import Checkpoint

# The issue asks for 1e-4. Alpha agrees to ~3e-14 with float64 Gram spectra, but WeightWatcher
# hands some columns (xmin) back as float32, so 1e-6 is as tight as the comparison can be; it still
# catches a regression to float32 spectra (which moves alpha by ~2e-5, methods.md section 2).
REL_TOL = 1e-6
COMPARED = ("alpha", "D", "xmin", "stable_rank", "log_norm")

_WW_SCRIPT = """
import json, os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import weightwatcher as ww
df = ww.WeightWatcher(model=sys.argv[1]).analyze()
cols = ["name", "N", "M", "alpha", "D", "xmin", "stable_rank", "log_norm"]
print("WWJSON" + df[cols].to_json(orient="records"))
"""


@pytest.fixture(scope="module")
def minilm_analysis(minilm_path: Path):
    return analyze(minilm_path, AnalyzeOptions(device="cpu"), cache=None)


@pytest.fixture(scope="module")
def ww_rows(minilm_path: Path) -> list[dict]:
    if importlib.util.find_spec("weightwatcher") is None:
        pytest.skip("weightwatcher is not installed (pip install -e '.[dev]')")
    # one BLAS thread: on a shared 2-core box WeightWatcher's SVDs thrash with more (5 s vs 30 s)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _WW_SCRIPT, str(minilm_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("WWJSON")]
    assert proc.returncode == 0 and lines, proc.stderr[-2000:]
    return json.loads(lines[-1][len("WWJSON") :])


def test_every_ww_matrix_agrees(minilm_analysis, ww_rows: list[dict]) -> None:
    ours = {lm.name: lm for lm in minilm_analysis.layers}
    assert len(ww_rows) >= 37
    for row in ww_rows:
        lm = ours[row["name"] + ".weight"]
        assert (row["N"], row["M"]) == (max(lm.shape), min(lm.shape))
        for metric in COMPARED:
            want, got = row[metric], getattr(lm, metric)
            assert got == pytest.approx(want, rel=REL_TOL), (lm.key, metric, got, want)
    # WeightWatcher skips only matrices it cannot fit (token_type_embeddings: 2 x 384)
    skipped = set(ours) - {r["name"] + ".weight" for r in ww_rows}
    assert all(ours[k].fit_status == "skipped" for k in skipped), skipped


def test_fits_equal_float64_reference(minilm_analysis, minilm_path: Path) -> None:
    """Always on: our alphas on MiniLM equal a plain-loop fit of float64 SVD eigenvalues."""
    keys = [
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.3.intermediate.dense.weight",
        "pooler.dense.weight",
    ]
    with Checkpoint.open(str(minilm_path)) as ck:
        for key in keys:
            W = ck.read(key, dtype=None).double().numpy()
            lam = np.linalg.svd(W, compute_uv=False) ** 2
            alpha, xmin, d, n = reference_fit(lam)
            lm = minilm_analysis.layer(key)
            assert lm.alpha == pytest.approx(alpha, rel=1e-9)
            assert lm.xmin == pytest.approx(xmin, rel=1e-9)
            assert lm.D == pytest.approx(d, rel=1e-9)
            assert lm.num_pl_spikes == n
