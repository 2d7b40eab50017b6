"""Cost of each WeightWatcher option in spectra next to WeightWatcher 0.7.7's, on the bundled
MiniLM (all 38 matrices; issue 18). Every measurement runs in a fresh subprocess (WeightWatcher's
import-time logging side effects contained), one BLAS thread, spectrum cache off for ours.

    .venv/bin/python benchmarks/bench_ww_options.py                       # every option set
    .venv/bin/python benchmarks/bench_ww_options.py --options mp_fit,xmax --json out.json

Options (ours / WeightWatcher's analyze() arguments):
    default     AnalyzeOptions()                     / analyze()
    mp_fit      mp_fit=True, mp_method="ww"          / mp_fit=True
    randomize   randomize=True, mp_method="ww"       / randomize=True
    clip_xmax   fix_fingers="clip_xmax"              / fix_fingers="clip_xmax"
    xmin_peak   fix_fingers="xmin_peak"              / (fails on every layer with powerlaw 2.0)
    xmax        xmax=3                               / xmax=3
Prints one row per option set: seconds for each tool and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

OPTIONS: dict[str, tuple[str, str | None]] = {
    "default": ("", ""),
    "mp_fit": ("mp_fit=True, mp_method='ww'", "mp_fit=True"),
    "randomize": ("randomize=True, mp_method='ww'", "randomize=True"),
    "clip_xmax": ("fix_fingers='clip_xmax'", "fix_fingers='clip_xmax'"),
    "xmin_peak": ("fix_fingers='xmin_peak'", None),
    "xmax": ("xmax=3", "xmax=3"),
}

_OURS = """
import json, sys, time, torch
torch.set_num_threads(1)
from spectra.jobs.report import AnalyzeOptions, analyze
from spectra.sources.bundled import bundled_model_path
t = time.perf_counter()
an = analyze(bundled_model_path(), AnalyzeOptions(device="cpu", {kw}), cache=None)
print("BENCH" + json.dumps({{"time_s": time.perf_counter() - t, "n": len(an.layers)}}))
"""

_WW = """
import json, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import weightwatcher as ww
from spectra.sources.bundled import bundled_model_path
watcher = ww.WeightWatcher(model=str(bundled_model_path()))
t = time.perf_counter()
df = watcher.analyze({kw})
print("BENCH" + json.dumps({{"time_s": time.perf_counter() - t, "n": len(df)}}))
"""


def run_job(code: str) -> dict[str, Any]:
    """One measurement in a fresh interpreter with one BLAS thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark job failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("BENCH") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", default=",".join(OPTIONS), help="comma-separated sets")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    names = [n.strip() for n in args.options.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        parser.error(f"unknown option sets {unknown}; choose from {list(OPTIONS)}")
    rows = []
    print(f"{'option':<10} {'spectra s':>10} {'WW s':>8} {'WW/spectra':>10}")
    for name in names:
        ours_kw, ww_kw = OPTIONS[name]
        ours = run_job(_OURS.format(kw=ours_kw))
        theirs = run_job(_WW.format(kw=ww_kw)) if ww_kw is not None else None
        row = {"option": name, "spectra_s": ours["time_s"], "ww_s": None, "ratio": None}
        if theirs is not None:
            row["ww_s"] = theirs["time_s"]
            row["ratio"] = theirs["time_s"] / ours["time_s"]
        rows.append(row)
        ww_s = "n/a" if row["ww_s"] is None else f"{row['ww_s']:.2f}"
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.1f}x"
        print(f"{name:<10} {ours['time_s']:>10.2f} {ww_s:>8} {ratio:>10}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
