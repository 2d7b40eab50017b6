"""`spectra report` of a >= 300M-parameter checkpoint against its float64 floor (issue 19).

Three measurements, each in a fresh process, CPU (user + sys) and peak RSS from `os.wait4`:

- floor: a bare loop that reads each weight matrix (float32) and computes the eigenvalues of
  its float64 Gram matrix (`W64^T W64` of the smaller side, full product, `eigvalsh`): the
  least any exact-spectrum report must do. The loop alone is timed (imports not counted).
- command: `python -m spectra report DIR --out OUT --force -q --no-cache --threads T`, the whole
  process as a user runs it (imports, fits, plots, pages).
- kernel floor: the same loop with the engine's own kernel (`gram_svdvals` on each matrix
  read as stored, bf16: only the lower triangle of the Gram matrix is formed), the floor of
  this implementation rather than of the method.
- with --cache, the command's first run into an empty cache folder (shards hashed, spectra
  stored) as well.
- fixed: the same command on a tiny checkpoint of the same structure (the same matrix names,
  widths divided by 32): imports, per-run set-up and the per-matrix plots and pages, without
  the large-matrix compute.

Ratio = command / (floor + fixed), for CPU and wall. The issue's target: <= 1.1.

The checkpoint (written once into DIR if missing): Llama-shaped bf16 with TinyLlama-1.1B widths
(hidden 2048, intermediate 5632, 4 KV heads of 64, vocab 32000), `--layers` layers (4 -> 30
matrices, 307M parameters), entries with a decaying column scaling (bench_engine.write_llama),
in `--shards` shards with an index.

`--pythonpath A,B` runs the command once per entry with that PYTHONPATH (e.g. a checkout of
main and a worktree), alternated in each repeat, for before/after pairs measured in one loop.

    OMP_NUM_THREADS=1 python benchmarks/bench_floor.py --dir /tmp/floor300 --threads 1,2
    python benchmarks/bench_floor.py --dir /tmp/floor300 --device cuda --threads 4 --cache
    python benchmarks/bench_floor.py --dir /tmp/floor300 --pythonpath /work/main,. --repeat 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_engine import write_llama

_FLOOR = """
import json, resource, sys, time, torch
torch.set_num_threads({threads})
from spectra.sources.checkpoint import Checkpoint
ck = Checkpoint.open(sys.argv[1])
refs = ck.matrices()
ru0 = resource.getrusage(resource.RUSAGE_SELF)
t = time.perf_counter()
dev = torch.device({device!r})
if {kernel!r} == "engine":
    from spectra.linalg.exact import gram_svdvals
    for _ref, W in ck.read_many(refs, dtype=torch.bfloat16):
        gram_svdvals(W.to(dev)[None]).cpu()
        del W
else:
    for _ref, W in ck.read_many(refs, dtype=torch.float32):
        W64 = W.to(dev).double()
        G = W64.T @ W64 if W64.shape[0] >= W64.shape[1] else W64 @ W64.T
        torch.linalg.eigvalsh(G).cpu()
        del W, W64, G
dt = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_SELF)
cpu = ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime
print("BENCH" + json.dumps({{"wall_s": dt, "cpu_s": cpu, "matrices": len(refs)}}))
"""


def _env(threads: int, pythonpath: str | None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    # what the `spectra` entry point sets unless the user chose: idle OpenMP threads sleep
    # instead of spinning on the cores the working ones need (the floor gets the same)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    if pythonpath:
        env["PYTHONPATH"] = str(Path(pythonpath).resolve())
    return env


def _popen_wait4(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run `cmd` (output to files, so only wait4 reaps it): wall, CPU (user + sys of it and
    its children), peak RSS, stdout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd} failed:\n{err.read().decode()[-3000:]}")
        return {
            "wall_s": wall,
            "cpu_s": ru.ru_utime + ru.ru_stime,
            "rss_mib": ru.ru_maxrss / 1024,
            "stdout": out.read().decode(),
        }


def floor(
    path: Path, threads: int, pythonpath: str | None, kernel: str, device: str = "cpu"
) -> dict[str, Any]:
    code = _FLOOR.format(threads=threads, kernel=kernel, device=device)
    res = _popen_wait4([sys.executable, "-c", code, str(path)], _env(threads, pythonpath))
    lines = [ln for ln in res["stdout"].splitlines() if ln.startswith("BENCH")]
    inner = json.loads(lines[-1][len("BENCH") :])
    return {**inner, "rss_mib": res["rss_mib"]}


def command(
    path: Path, threads: int, pythonpath: str | None, cache: bool = False, device: str = "cpu"
) -> dict[str, Any]:
    """The report command, `--no-cache`, or (cache) its first run into an empty cache folder
    (every shard hashed, every spectrum stored)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "spectra", "report", str(path), "--out", f"{tmp}/r"]
        cmd += ["--force", "-q", "--threads", str(threads), "--device", device]
        cmd += ["--cache-dir", f"{tmp}/cache"] if cache else ["--no-cache"]
        res = _popen_wait4(cmd, _env(threads, pythonpath))
        metrics = Path(tmp, "r", "metrics.json").read_bytes()
    return {**res, "metrics_sha256": hashlib.sha256(metrics).hexdigest()[:16]}


def write_tiny(folder: Path, layers: int, vocab: int, shards: int) -> None:
    """The structure of `write_llama`'s checkpoint at 1/32 of its widths."""
    import bench_engine

    saved = (bench_engine.HIDDEN, bench_engine.INTER, bench_engine.KV)
    bench_engine.HIDDEN, bench_engine.INTER, bench_engine.KV = 64, 176, 8
    try:
        write_llama(folder, layers, vocab // 32, shards)
    finally:
        bench_engine.HIDDEN, bench_engine.INTER, bench_engine.KV = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="folder of the checkpoint (kept)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--pythonpath", default="", help="comma-separated PYTHONPATHs to compare")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (floors and command)")
    ap.add_argument("--skip-floor", action="store_true")
    ap.add_argument(
        "--cache", action="store_true", help="also time a first run into an empty cache folder"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write every sample here")
    args = ap.parse_args()
    big, tiny = args.dir / "big", args.dir / "tiny"
    for folder, writer in ((big, write_llama), (tiny, write_tiny)):
        if not (folder / "model.safetensors.index.json").exists():
            folder.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            writer(folder, args.layers, args.vocab, args.shards)
            print(f"wrote {folder} in {time.perf_counter() - t:.0f} s", flush=True)
    size = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    print(f"checkpoint: {big} ({size / 1e9:.2f} GB bf16); load {os.getloadavg()}", flush=True)
    paths = [p for p in args.pythonpath.split(",") if p] or [None]
    samples: list[dict[str, Any]] = []
    print(
        "| threads | PYTHONPATH | floor wall / CPU s | kernel floor wall / CPU s "
        "| fixed wall / CPU s | command wall / CPU s | peak RSS MiB "
        "| command / (floor + fixed): wall, CPU | same, kernel floor | load | metrics.json |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    nan = {"wall_s": float("nan"), "cpu_s": float("nan")}
    for _ in range(args.repeat):
        for threads in (int(t) for t in args.threads.split(",")):
            fl, kf = nan, nan
            if not args.skip_floor:
                fl = floor(big, threads, paths[-1], "full", args.device)
                kf = floor(big, threads, paths[-1], "engine", args.device)
            for pp in paths:
                load0 = os.getloadavg()[0]
                fx = command(tiny, threads, pp, device=args.device)
                cm = command(big, threads, pp, device=args.device)
                cached = command(big, threads, pp, True, args.device) if args.cache else None
                load1 = os.getloadavg()[0]
                sample = {"threads": threads, "pythonpath": pp, "floor": fl, "kernel_floor": kf}
                sample |= {"fixed": fx, "command": cm, "cached_first_run": cached}
                samples.append({**sample, "load": [load0, load1]})

                def ratios(base: dict[str, float], fx: dict = fx, cm: dict = cm) -> str:
                    rw = cm["wall_s"] / (base["wall_s"] + fx["wall_s"])
                    return f"{rw:.2f}, {cm['cpu_s'] / (base['cpu_s'] + fx['cpu_s']):.2f}"

                print(
                    f"| {threads} | {pp} | {fl['wall_s']:.1f} / {fl['cpu_s']:.1f} | "
                    f"{kf['wall_s']:.1f} / {kf['cpu_s']:.1f} | "
                    f"{fx['wall_s']:.1f} / {fx['cpu_s']:.1f} | "
                    f"{cm['wall_s']:.1f} / {cm['cpu_s']:.1f} | {cm['rss_mib']:.0f} | "
                    f"{ratios(fl)} | {ratios(kf)} | {load0:.1f}-{load1:.1f} | "
                    f"{cm['metrics_sha256']} |",
                    flush=True,
                )
                if cached is not None:
                    print(
                        f"|   | {pp}, first run into an empty cache | | | | "
                        f"{cached['wall_s']:.1f} / {cached['cpu_s']:.1f} | "
                        f"{cached['rss_mib']:.0f} | | | | {cached['metrics_sha256']} |",
                        flush=True,
                    )
    if args.json:
        args.json.write_text(json.dumps(samples, indent=1, default=str))


if __name__ == "__main__":
    main()
