"""One intra-op thread against torch's default (one per core) on MiniLM's matrices and commands.

    .venv/bin/python benchmarks/bench_threads.py                  # kernels + commands, 3 repeats
    .venv/bin/python benchmarks/bench_threads.py --skip-commands  # kernels only

Each setting runs in a fresh process whose environment fixes the thread count before torch is
imported: `1` (SPECTRA_NUM_THREADS=1, the CLI's default), `default` (neither set: torch starts
one OpenMP thread per core, the CLI's former default) and `default-passive` (the same with
OMP_WAIT_POLICY=PASSIVE: waiting threads sleep instead of spinning). Kernels, on the 38 weight
matrices of the bundled MiniLM with both sides >= 64 (float32, 384 x 384 to 1536 x 384): the
report's float64 Gram eigenvalues, LAPACK's full SVD (`torch.linalg.svd`) and the randomized
SVD (top 16, init's route for a rank-16 PiSSA). Commands, whole process on MiniLM:
`spectra report --no-cache` and `spectra init --method pissa --rank 16` (with
`--threads` given explicitly). Wall seconds are what a user waits; CPU seconds (user + sys) are
what the box pays: on a busy box spinning threads burn CPU without progress. Medians of
alternated runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

SETTINGS = {
    "1": {"SPECTRA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
    "default": {},
    "default-passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}
_THREAD_VARS = ("SPECTRA_NUM_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")

_KERNELS = """
import json, time, torch
from spectra.linalg.exact import gram_svdvals
from spectra.linalg.rsvd import randomized_svd
from spectra.sources.bundled import bundled_model_path
from spectra.sources.checkpoint import Checkpoint
with Checkpoint.open(str(bundled_model_path())) as ckpt:
    mats = [W for _, W in ckpt.read_many(ckpt.matrices()) if min(W.shape) >= 64]
out = {"threads": torch.get_num_threads()}
for name, fn in (
    ("gram64 eigenvalues", lambda W: gram_svdvals(W[None])),
    ("full SVD (LAPACK)", lambda W: torch.linalg.svd(W, full_matrices=False)),
    ("randomized SVD k=16", lambda W: randomized_svd(W, 16)),
):
    fn(mats[0])
    t, c = time.perf_counter(), time.process_time()
    for W in mats:
        fn(W)
    out[name] = (time.perf_counter() - t, time.process_time() - c)
print("BENCH" + json.dumps(out))
"""


def _env(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _THREAD_VARS}
    return {**env, **SETTINGS[setting]}


def _child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def kernels(setting: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", _KERNELS], env=_env(setting), capture_output=True, text=True
    )
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH")]
    if proc.returncode or not line:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(line[-1][5:])


def command(setting: str, args: list[str]) -> tuple[float, float]:
    """(wall, CPU) of one `spectra ...` command in a fresh process."""
    threads = "1" if setting == "1" else str(os.cpu_count() or 1)
    argv = [sys.executable, "-m", "spectra", *args, "--threads", threads]
    cpu0, t = _child_cpu(), time.perf_counter()
    subprocess.run(argv, env=_env(setting), check=True)
    return time.perf_counter() - t, _child_cpu() - cpu0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-commands", action="store_true")
    args = ap.parse_args()
    rows: list[tuple[str, str, float, float]] = []
    runs: dict[str, list[dict[str, object]]] = {s: [] for s in SETTINGS}
    for _ in range(max(1, args.repeat)):
        for setting in SETTINGS:  # alternated, so load drifts hit every setting alike
            runs[setting].append(kernels(setting))
    for setting, results in runs.items():
        for name in results[0]:
            if name == "threads":
                continue
            wall = statistics.median(r[name][0] for r in results)  # type: ignore[index]
            cpu = statistics.median(r[name][1] for r in results)  # type: ignore[index]
            label = f"{name}, MiniLM matrices ({results[0]['threads']} threads)"
            rows.append((setting, label, wall, cpu))
    if not args.skip_commands:
        with tempfile.TemporaryDirectory() as tmp:
            cmds = {
                "spectra report --no-cache": ["report", "--out", f"{tmp}/r", "--force", "-q"]
                + ["--no-cache"],
                "spectra init --method pissa --rank 16": ["init", "--out", f"{tmp}/i", "--force"]
                + ["--method", "pissa", "--rank", "16"],
            }
            for label, cmd in cmds.items():
                timings: dict[str, list[tuple[float, float]]] = {s: [] for s in SETTINGS}
                for _ in range(max(1, args.repeat)):
                    for setting in SETTINGS:
                        timings[setting].append(command(setting, cmd))
                for setting, ts in timings.items():
                    wall = statistics.median(t[0] for t in ts)
                    cpu = statistics.median(t[1] for t in ts)
                    rows.append((setting, label, wall, cpu))
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    width = max(len(r[1]) for r in rows)
    print(f"{'setting':<16} {'measurement':<{width}} {'wall s':>8} {'CPU s':>8}")
    for setting, label, wall, cpu in sorted(rows, key=lambda r: (r[1], r[0])):
        print(f"{setting:<16} {label:<{width}} {wall:8.2f} {cpu:8.2f}")


if __name__ == "__main__":
    main()
