"""CPU cost of the report's plots and of the whole `spectra report` command on the bundled MiniLM.

    .venv/bin/python benchmarks/bench_plots.py               # 3 repeats, medians
    .venv/bin/python benchmarks/bench_plots.py --repeat 1    # quick

One thread (OMP_NUM_THREADS=1), spectrum cache off for the analysis. Prints CPU seconds
(process time, the fair number on a shared box) per plot kind: an ESD plot drawn into the
report's reused figure (`EsdCanvas`, what `write_report` does) and into a fresh figure, each
model-level plot, all of `render_plots`; then whole commands, each in a fresh process (user +
sys CPU of the child): `spectra report --no-cache`; a first run into an empty cache folder; the
cached rerun (analysis and plots served from the cache: no torch, no matplotlib); and a rerun
with only the spectra and the plots cached (the cached analysis removed: torch imported, fits
rerun, nothing redrawn). Last, the budget of a cold command: the CPU each heavy import costs
in a fresh interpreter (over a bare `python -c pass`), and the analysis, plots and pages
measured in this process.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _cpu(func: Callable[[], object]) -> float:
    start = time.process_time()
    func()
    return time.process_time() - start


def _command_cpu(args: list[str]) -> float:
    """user + sys CPU seconds of one `spectra` command run in a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "spectra", *args], check=True, env={**os.environ})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


#: what the cold `spectra report` imports, one fresh interpreter each (cumulative: numpy is
#: inside torch's and matplotlib's figures)
IMPORTS = {
    "python itself (-c pass)": "pass",
    "numpy": "import numpy",
    "torch": "import torch",
    "scipy.optimize (--mp-method ww only, since round 4)": "import scipy.optimize",
    "matplotlib (Figure, Agg)": "import matplotlib.figure, matplotlib.backends.backend_agg",
    "typer + rich (spectra.cli.main)": "import spectra.cli.main",
    "spectra.jobs.report (torch, numpy, the engine, the fits)": "import spectra.jobs.report",
}


def _import_cpu(statement: str) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", statement], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="repeats per measurement (median)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from spectra.jobs.report import analyze
    from spectra.reports import plots as P
    from spectra.reports import report as R

    analysis = analyze(cache=False)
    assert analysis is not None
    keys = R.select_esd_keys(analysis)
    by_key = {lm.key: lm for lm in analysis.layers}
    P.esd_plot(analysis.esds[keys[0]], by_key[keys[0]])  # fonts and caches warm

    def esd_reused() -> None:
        canvas = P.EsdCanvas()
        for key in keys:
            P.esd_plot(analysis.esds[key], by_key[key], canvas)

    def esd_fresh() -> None:
        for key in keys:
            P.esd_plot(analysis.esds[key], by_key[key])

    rows: list[tuple[str, float]] = []
    n = len(keys)
    rows.append(("ESD plot, reused figure (ms each)", 1000 / n * _median(esd_reused, args.repeat)))
    rows.append(("ESD plot, fresh figure (ms each)", 1000 / n * _median(esd_fresh, args.repeat)))
    for stem, _title, _caption, render in R.SUMMARY_PLOTS:
        rows.append((f"{stem} (ms)", 1000 * _median(lambda r=render: r(analysis), args.repeat)))
    rows.append(
        (
            f"render_plots, {n} ESD + {len(R.SUMMARY_PLOTS)} summary (s)",
            _median(lambda: R.render_plots(analysis), args.repeat),
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "report")
        nocache = ["report", "--out", out, "--force", "--no-cache", "-q"]
        rows.append(("spectra report --no-cache, whole command (s)", _median_cmd(nocache, args)))
        colds, warms, spectra_only = [], [], []
        for i in range(max(1, args.repeat)):
            cache = Path(tmp) / f"c{i}"
            cmd = ["report", "--out", out, "--force", "-q", "--cache-dir", str(cache)]
            colds.append(_command_cpu(cmd))  # an empty cache: computes, draws, stores
            warms.append(_command_cpu(cmd))  # everything from the cache
            shutil.rmtree(cache / "blobs" / "v1" / "analysis")  # spectra + plots cached only
            spectra_only.append(_command_cpu(cmd))
        cold, warm = statistics.median(colds), statistics.median(warms)
        rows.append(("spectra report, first run into an empty cache (s)", cold))
        rows.append(("spectra report, cached rerun (s)", warm))
        rows.append(("  cold / cached rerun (x)", cold / warm))
        rows.append(
            (
                "spectra report, rerun with spectra + plots cached (s)",
                statistics.median(spectra_only),
            )
        )
    rows.append(("-- budget of a cold command: imports, each in a fresh interpreter (s)", 0.0))
    bare = statistics.median(_import_cpu("pass") for _ in range(max(1, args.repeat)))
    for name, statement in IMPORTS.items():
        cpu = statistics.median(_import_cpu(statement) for _ in range(max(1, args.repeat)))
        rows.append((f"  {name}", cpu if statement == "pass" else cpu - bare))
    rows.append(("-- and the work, in this process (s)", 0.0))
    rows.append(("  analyze(), spectrum cache off", _median(lambda: analyze(cache=False), 1)))
    rows.append(("  render_plots (all plots)", _median(lambda: R.render_plots(analysis), 1)))
    with tempfile.TemporaryDirectory() as tmp:
        from spectra.blobcache import BlobCache

        filled = BlobCache(Path(tmp) / "c", "plots")
        R.render_plots(analysis, cache=filled)

        def pages() -> None:
            R.write_report(analysis, Path(tmp) / "r", force=True, plot_cache=filled)

        rows.append(("  write_report, plots from a cache (pages, JSON, CSV, files)", _cpu(pages)))
    width = max(len(name) for name, _ in rows)
    print(f"{'measurement (CPU)':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value:8.3f}")


def _median(func: Callable[[], object], repeat: int) -> float:
    return statistics.median(_cpu(func) for _ in range(max(1, repeat)))


def _median_cmd(cmd: list[str], args: argparse.Namespace) -> float:
    return statistics.median(_command_cpu(cmd) for _ in range(max(1, args.repeat)))


if __name__ == "__main__":
    main()
