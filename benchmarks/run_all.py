"""Run every benchmark in this folder once, at quick sizes, and print each one's table.

None of the benchmarks has a "quick" switch of its own; each takes size arguments, and QUICK
below picks small ones (same code paths; measured 6 s to 2.3 min each, about 8 min in all, on a
loaded 2-core CPU). The numbers a quick run prints are a smoke test of the benchmark, not the
figures quoted in docs/: those come from each script's documented command line (see its
docstring). A script without an entry in QUICK is an error, so a new benchmark cannot be skipped
silently.

    python benchmarks/run_all.py                  # all of them, quick sizes
    python benchmarks/run_all.py --only svd,init  # a subset (names without bench_ and .py)

Each script runs in its own process with its own output; scratch folders go to one temporary
directory removed at the end. Exit status 1 when any script failed (the summary says which).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# script stem -> quick arguments; "{tmp}" is replaced by a fresh scratch folder.
QUICK: dict[str, list[str]] = {
    "bench_svd": ["--shape", "512x512", "--shape", "1024x256", "--k", "16"],
    "bench_engine": ["--layers", "1"],
    "bench_scaling": ["--scale", "16"],
    "bench_compare": ["--workdir", "{tmp}", "--hidden", "256", "--inter", "704", "--layers", "1"],
    "bench_init": ["--rank", "8", "--threads", "1", "--llama", "256,704"],
    "bench_calib": ["--samples", "8", "--max-length", "32", "--rank", "4", "--threads", "1"],
    "bench_report_vs_ww": ["--jobs", "ours,ww", "--threads", "1"],
    "bench_stream": ["--gb", "0.1", "--dir", "{tmp}"],  # one 4096/11008 layer: 0.4 GB on disk
    "bench_cache_identity": ["--synthetic-mb", "50", "--dir", "{tmp}", "--repeat", "1"],
    "bench_longrun": ["--size-gb", "0.05", "--intermediate", "4096", "--threads", "1"],
    "bench_plots": ["--repeat", "1"],
    "bench_ww_options": ["--options", "default,xmax"],
    "bench_expert_overlap": ["--shape", "256x512", "--experts", "2", "--threads", "1"],
    "bench_smooth": ["--jobs", "smooth,remove_traps", "--tools", "ours"],
    "bench_plan": [
        "--hidden",
        "256",
        "--inter",
        "704",
        "--layers",
        "2",
        "--vocab",
        "1000",
        "--dir",
        "{tmp}",
        "--threads",
        "1",
    ],
    "bench_quantized": ["--gb", "0.05", "--dir", "{tmp}", "--passes", "read"],
    "bench_hub_bytes": ["--layers", "2", "--hidden", "128", "--shards", "2"],
    "bench_threads": ["--repeat", "1", "--skip-commands"],
    "bench_gguf": ["--gb", "0.1", "--dir", "{tmp}"],  # SmolLM2's 98 MB file + a 0.1 GB Q4_K one
    "bench_powerlaw": ["--sizes", "512,2048", "--repeat", "1"],
    "bench_memory": [
        "--workdir",
        "{tmp}",
        "--hidden",
        "256",
        "--inter",
        "688",
        "--vocab",
        "2000",
        "--embed",
        "256",
    ],
    "bench_eva": ["--samples", "16", "--max-length", "32", "--rank", "4", "--threads", "1"],
    "bench_floor": ["--dir", "{tmp}", "--layers", "1", "--vocab", "0", "--threads", "1"],
}


def scripts() -> list[Path]:
    """Every bench_*.py here; raises SystemExit for one QUICK does not cover."""
    found = sorted(HERE.glob("bench_*.py"))
    missing = [p.name for p in found if p.stem not in QUICK]
    if missing:
        raise SystemExit(f"no quick arguments for {', '.join(missing)}: add them to QUICK")
    return found


def run(script: Path, scratch: Path) -> tuple[int, float]:
    """Run one benchmark at its quick sizes, output straight to ours; (exit status, seconds)."""
    folder = scratch / script.stem
    folder.mkdir()
    args = [a.replace("{tmp}", str(folder)) for a in QUICK[script.stem]]
    print(f"\n== {script.name} {' '.join(QUICK[script.stem])}", flush=True)
    t0 = time.perf_counter()
    code = subprocess.run([sys.executable, str(script), *args], check=False).returncode
    return code, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated names, e.g. svd,init")
    args = ap.parse_args()
    chosen = scripts()
    if args.only:
        wanted = {f"bench_{n.strip().removeprefix('bench_')}" for n in args.only.split(",")}
        unknown = sorted(wanted - {p.stem for p in chosen})
        if unknown:
            raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}")
        chosen = [p for p in chosen if p.stem in wanted]
    results = []
    with tempfile.TemporaryDirectory(prefix="spectra-bench-") as tmp:
        for script in chosen:
            results.append((script.name, *run(script, Path(tmp))))
    print("\n| benchmark | status | seconds |\n|---|---|---:|")
    for name, code, seconds in results:
        print(f"| {name} | {'ok' if code == 0 else f'FAILED ({code})'} | {seconds:.0f} |")
    sys.exit(1 if any(code for _, code, _ in results) else 0)


if __name__ == "__main__":
    main()
