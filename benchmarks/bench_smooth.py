"""Cost of `spectra smooth` / `spectra remove-traps` next to WeightWatcher 0.7.7's SVDSmoothing()
and SVDSharpness() on the bundled MiniLM (all 40 matrices; issue 18). Every measurement runs in a
fresh subprocess with one BLAS thread; peak RSS is the subprocess's.

    .venv/bin/python benchmarks/bench_smooth.py                        # every job, both tools
    .venv/bin/python benchmarks/bench_smooth.py --jobs smooth --tools ours

Jobs (ours / WeightWatcher's, on a transformers BertModel built from the bundled folder):
    smooth        smooth(SmoothOptions())                              / SVDSmoothing()
    sharpen       smooth(SmoothOptions(mode="sharpen", mp_method="ww")) / SVDSharpness()
    remove_traps  remove_traps(RemoveTrapsOptions())                   / (0.8 only: not installed)
Ours reads the checkpoint and writes the new one (shard by shard); WeightWatcher changes a model
already loaded in memory and writes nothing (its model load is not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

JOBS = ("smooth", "sharpen", "remove_traps")
TOOLS = ("ours", "ww")

_OURS = """
import json, resource, sys, time, torch
torch.set_num_threads(1)
from spectra.jobs.remove_traps import RemoveTrapsOptions, remove_traps
from spectra.jobs.smooth import SmoothOptions, smooth
from spectra.sources.bundled import bundled_model_path
job, out = sys.argv[1], sys.argv[2]
t = time.perf_counter()
if job == "remove_traps":
    res = remove_traps(bundled_model_path(), out, RemoveTrapsOptions(), force=True)
else:
    mode = "sharpen" if job == "sharpen" else "smooth"
    opts = SmoothOptions(mode=mode, mp_method="ww", device="cpu")
    res = smooth(bundled_model_path(), out, opts, force=True)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("BENCH" + json.dumps({"time_s": dt, "changed": len(res.changed), "peak_mib": peak}))
"""

_WW = """
import json, os, resource, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
import weightwatcher as ww
from transformers import BertModel
from spectra.sources.bundled import bundled_model_path
model = BertModel.from_pretrained(str(bundled_model_path()))
before = {k: v.clone() for k, v in model.state_dict().items()}
watcher = ww.WeightWatcher()
t = time.perf_counter()
if sys.argv[1] == "smooth":
    watcher.SVDSmoothing(model=model)
else:
    watcher.SVDSharpness(model=model)
dt = time.perf_counter() - t
changed = sum(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("BENCH" + json.dumps({"time_s": dt, "changed": changed, "peak_mib": peak}))
"""


def run_job(code: str, *args: str) -> dict[str, Any]:
    """One measurement in a fresh interpreter with one BLAS thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark job failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("BENCH") :])


def _names(text: str, allowed: tuple[str, ...], parser: argparse.ArgumentParser) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        parser.error(f"unknown {unknown}; choose from {list(allowed)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default=",".join(JOBS), help="comma-separated jobs")
    parser.add_argument("--tools", default=",".join(TOOLS), help="ours, ww or both")
    args = parser.parse_args()
    jobs = _names(args.jobs, JOBS, parser)
    tools = _names(args.tools, TOOLS, parser)
    print(f"{'job':<13} {'tool':<5} {'seconds':>8} {'changed':>8} {'peak MiB':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for job in jobs:
            for tool in tools:
                if tool == "ww" and job == "remove_traps":
                    print(f"{job:<13} {tool:<5} {'n/a':>8} (WeightWatcher 0.8 only)")
                    continue
                row = run_job(_OURS, job, f"{tmp}/{job}") if tool == "ours" else run_job(_WW, job)
                print(
                    f"{job:<13} {tool:<5} {row['time_s']:>8.2f} {row['changed']:>8d} "
                    f"{row['peak_mib']:>9.0f}"
                )


if __name__ == "__main__":
    main()
