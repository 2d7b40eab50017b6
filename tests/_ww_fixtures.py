"""Run WeightWatcher 0.7.7 on the bundled MiniLM in a subprocess and return its rows as JSON.

A subprocess because importing weightwatcher sets the root logger to INFO and silences all
warnings for the whole process. One BLAS thread: on a shared 2-core box its SVDs thrash with
more. Each session fixture of the tests runs WeightWatcher once per option set, on a few layers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# WeightWatcher's layer ids of the bundled MiniLM (PyStateDict ids start at 1), and our keys
WW_LAYERS = {
    1: "embeddings.position_embeddings.weight",  # 512 x 384
    7: "encoder.layer.0.attention.self.query.weight",  # 384 x 384 (Q = 1: quarter circle)
    9: "encoder.layer.0.intermediate.dense.weight",  # 1536 x 384
    11: "encoder.layer.0.output.dense.weight",  # 384 x 1536
}

# WeightWatcher shuffles with the unseeded global numpy generator; the harness replaces its
# shuffle by spectra's seeded permutation (torch.randperm, seed 0: randomized.shuffle_entries)
# so both tools decompose the very same shuffled matrices.
_PRELUDE = """
import json, os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import numpy as np, torch
import weightwatcher as ww

def _spectra_shuffle(x):
    gen = torch.Generator(device="cpu").manual_seed(0)
    x[:] = x[torch.randperm(x.size, generator=gen).numpy()]

np.random.shuffle = _spectra_shuffle
watcher = ww.WeightWatcher(model=sys.argv[1])
"""


def run_ww(model: Path, body: str) -> object:
    """Run `body` after the prelude (names: json, np, ww, watcher); it must print one line
    `WWJSON<json>`, which is returned parsed."""
    if importlib.util.find_spec("weightwatcher") is None:
        pytest.skip("weightwatcher is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _PRELUDE + body, str(model)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("WWJSON")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("WWJSON") :])


def ww_rows(model: Path, kwargs: str, extra: str = "None", setup: str = "") -> dict[str, dict]:
    """WeightWatcher's analyze(layers=WW_LAYERS, **kwargs) rows by our key, its get_summary()
    under "__summary__", and the value of the expression `extra` (evaluated in the same
    process after the statements `setup`, saving a WeightWatcher start-up) under
    "__extra__"."""
    body = (
        setup
        + f"""
df = watcher.analyze(layers={sorted(WW_LAYERS)}, {kwargs})
rows = json.loads(df.to_json(orient="records"))
extra = {extra}
print("WWJSON" + json.dumps({{"rows": rows, "summary": watcher.get_summary(), "extra": extra}}))
"""
    )
    out = run_ww(model, body)
    rows = {row["name"] + ".weight": row for row in out["rows"]}
    rows["__summary__"] = out["summary"]
    rows["__extra__"] = out["extra"]
    return rows
