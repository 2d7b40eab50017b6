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
    tpl         fit="TPL"                            / fit="TPL" (fails on every layer)
    e_tpl       fit="E_TPL"                          / fit="E_TPL" (fails on every layer)
    force       xmax="force"                         / xmax="force" (fails on every layer)
    best_fit    best_fit=True                        / (none: commented out in 0.7.7)
    fit_entropy fit_entropy=True                     / (none: commented out in 0.7.7)
Prints one row per option set: seconds for each tool and their ratio. Where WeightWatcher
0.7.7 fails (it passes `distribution=` to powerlaw.Fit, which powerlaw 2.0 refuses) or has no
such column, the powerlaw-package call it makes (or would make) is timed instead on the first
--recipe-matrices matrices (`powerlaw.Fit(..., xmin_distribution=...)` and its fits; a TPL xmin
search takes it about a minute per 384-eigenvalue matrix), and both tools are compared per
matrix.
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
    "tpl": ("fit='TPL'", None),
    "e_tpl": ("fit='E_TPL'", None),
    "force": ("xmax='force'", None),
    "best_fit": ("best_fit=True", None),
    "fit_entropy": ("fit_entropy=True", None),
}

# The powerlaw-package call behind WeightWatcher 0.7.7's option (its pl_fit / pl_compare), on
# `nz` (the eigenvalues > 1e-5, ascending) and `peak` (the ESD peak of xmin_peak).
RECIPES: dict[str, str] = {
    "tpl": "fit = powerlaw.Fit(nz, xmin_distribution='truncated_power_law', verbose=0)\n"
    "fit.truncated_power_law",
    "e_tpl": "fit = powerlaw.Fit(nz, xmin=(np.log10(0.95 * peak), 1.5 * peak), "
    "xmin_distribution='truncated_power_law', verbose=0)\nfit.truncated_power_law",
    "force": "fit = powerlaw.Fit(nz, xmax=float(nz[-1]), verbose=0)\nfit.power_law",
    "best_fit": "fit = powerlaw.Fit(nz, verbose=0)\n"
    "for alt in ('truncated_power_law', 'lognormal', 'exponential'):\n"
    "    fit.distribution_compare('power_law', alt, normalized_ratio=True)",
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


_RECIPE = """
import json, time, warnings, numpy as np, torch, powerlaw
torch.set_num_threads(1)
warnings.simplefilter("ignore")
from spectra.analysis.fingers import esd_peak
from spectra.jobs.report import AnalyzeOptions, analyze
from spectra.sources.bundled import bundled_model_path
an = analyze(bundled_model_path(), AnalyzeOptions(device="cpu", outliers=False), cache=None)
total = 0.0
for lm in an.layers[:{count}]:
    lam = an.esds[lm.key]
    nz = np.sort(lam[lam > 1e-5])
    peak = esd_peak(nz)
    t = time.perf_counter()
    try:  # what WeightWatcher would run; a failure (as on the word embeddings) counts its time
{body}
    except ValueError:
        pass
    total += time.perf_counter() - t
print("BENCH" + json.dumps({{"time_s": total, "n": min({count}, len(an.layers))}}))
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
    parser.add_argument(
        "--recipe-matrices", type=int, default=2, help="matrices the powerlaw recipes run on"
    )
    args = parser.parse_args()
    names = [n.strip() for n in args.options.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        parser.error(f"unknown option sets {unknown}; choose from {list(OPTIONS)}")
    rows = []
    print(f"{'option':<11} {'spectra s':>10} {'WW s':>8} {'WW/spectra':>10}  per matrix")
    for name in names:
        ours_kw, ww_kw = OPTIONS[name]
        ours = run_job(_OURS.format(kw=ours_kw))
        theirs = run_job(_WW.format(kw=ww_kw)) if ww_kw is not None else None
        row = {"option": name, "spectra_s": ours["time_s"], "ww_s": None, "ratio": None}
        if theirs is not None:
            row["ww_s"] = theirs["time_s"]
            row["ratio"] = theirs["time_s"] / ours["time_s"]
        per_matrix = ""
        if name in RECIPES:
            body = "\n".join("        " + ln for ln in RECIPES[name].splitlines())
            recipe = run_job(_RECIPE.format(count=args.recipe_matrices, body=body))
            row["spectra_s_per_matrix"] = ours["time_s"] / ours["n"]
            row["powerlaw_s_per_matrix"] = recipe["time_s"] / recipe["n"]
            per_matrix = (
                f"spectra {row['spectra_s_per_matrix']:.2f} s, powerlaw recipe "
                f"{row['powerlaw_s_per_matrix']:.2f} s ({recipe['n']} matrices): "
                f"{row['powerlaw_s_per_matrix'] / row['spectra_s_per_matrix']:.1f}x"
            )
        rows.append(row)
        ww_s = "n/a" if row["ww_s"] is None else f"{row['ww_s']:.2f}"
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.1f}x"
        print(f"{name:<11} {ours['time_s']:>10.2f} {ww_s:>8} {ratio:>10}  {per_matrix}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
