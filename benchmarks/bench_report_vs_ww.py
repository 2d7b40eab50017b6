"""spectra.analyze() vs WeightWatcher analyze(): end-to-end time, peak RSS, alpha agreement.

Every measurement runs in a fresh subprocess (clean peak RSS, no shared caches, WeightWatcher's
import-time logging/warning side effects contained). Spectrum cache off for ours.

    .venv/bin/python benchmarks/bench_report_vs_ww.py                   # bundled MiniLM
    .venv/bin/python benchmarks/bench_report_vs_ww.py --synthetic DIR   # + Llama-shaped bf16
    .venv/bin/python benchmarks/bench_report_vs_ww.py --jobs ours,ww,ww_mp,ww_rand --json o.json
    .venv/bin/python benchmarks/bench_report_vs_ww.py --threads 1 --jobs ww,cmd,ww,cmd,cmd_cached

`cmd` is the whole `spectra report SOURCE --no-cache` command (all formats, every plot) in a
fresh process, `cmd_cached` its rerun on a filled cache folder; their CPU (imports included) is
set against WeightWatcher's `analyze()` call alone and against its whole process. `cmd_base` is
the same command run by another installation's interpreter (`--base-python`, e.g. a checkout
of the previous commit), for before/after pairs alternated in one loop.

The synthetic checkpoint (written once into DIR if missing): Llama-7B-shaped layers (hidden
4096, intermediate 11008, vocab 32000), `--layers` of them (4 -> 28 attention/MLP matrices +
embed_tokens + lm_head = 1.07B parameters), bf16, one shard per layer, entries
`0.02 * N(0, 1)` plus a seeded rank-16 signal so the ESDs have a tail to fit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_OURS = """
import json, resource, sys, time, torch
torch.set_num_threads({threads})
from spectra.jobs.report import AnalyzeOptions, analyze
ru0 = resource.getrusage(resource.RUSAGE_SELF)
cpu0, t = ru0.ru_utime + ru0.ru_stime, time.perf_counter()
an = analyze(sys.argv[1], AnalyzeOptions(device="cpu", mp_fit={mp}, randomize={rand}), cache=None)
dt = time.perf_counter() - t
alphas = {{lm.name.removesuffix(".weight"): lm.alpha for lm in an.layers}}
ru = resource.getrusage(resource.RUSAGE_SELF)
hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')]
rss = int(hwm[0].split()[1]) / 1024 if hwm else ru.ru_maxrss / 1024  # ru_maxrss survives exec
cpu = ru.ru_utime + ru.ru_stime - cpu0
print("BENCH" + json.dumps({{"time_s": dt, "cpu_s": cpu, "rss_mb": rss, "alphas": alphas}}))
"""

_WW = """
import json, os, resource, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
torch.set_num_threads({threads})
import weightwatcher as ww
ru0 = resource.getrusage(resource.RUSAGE_SELF)
cpu0, t = ru0.ru_utime + ru0.ru_stime, time.perf_counter()
df = ww.WeightWatcher(model=sys.argv[1]).analyze(mp_fit={mp}, randomize={rand})
dt = time.perf_counter() - t
alphas = dict(zip(df["name"], df["alpha"]))
ru = resource.getrusage(resource.RUSAGE_SELF)
hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')]
rss = int(hwm[0].split()[1]) / 1024 if hwm else ru.ru_maxrss / 1024  # ru_maxrss survives exec
cpu = ru.ru_utime + ru.ru_stime - cpu0
print("BENCH" + json.dumps({{"time_s": dt, "cpu_s": cpu, "rss_mb": rss, "alphas": alphas}}))
"""


def _child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_job(template: str, path: Path, threads: int, mp: bool, rand: bool) -> dict[str, Any]:
    """One measurement in a fresh interpreter; returns time_s, cpu_s (the call alone),
    proc_cpu_s (the whole process, imports included), rss_mb, alphas."""
    code = template.format(threads=threads, mp=mp, rand=rand)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    cpu0 = _child_cpu()
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark job failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1][len("BENCH") :]), "proc_cpu_s": _child_cpu() - cpu0}


def run_command(
    path: Path, threads: int, cached: bool, python: str = sys.executable
) -> dict[str, Any]:
    """The whole `spectra report SOURCE` command as a user runs it (all formats and plots), in
    a fresh process of `python`: --no-cache, or (cached) a rerun on a cache folder filled by a
    first run."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [python, "-m", "spectra", "report", str(path), "--out", f"{tmp}/r"]
        cmd += ["--force", "-q"]
        cmd += ["--cache-dir", f"{tmp}/cache"] if cached else ["--no-cache"]
        if cached:
            subprocess.run(cmd, check=True, env=env)
        cpu0, t = _child_cpu(), time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        dt = time.perf_counter() - t
    cpu = _child_cpu() - cpu0
    return {"time_s": dt, "cpu_s": cpu, "proc_cpu_s": cpu, "rss_mb": float("nan"), "alphas": {}}


def alpha_agreement(ours: dict[str, float | None], ww: dict[str, float]) -> dict[str, Any]:
    """Max relative alpha difference over the matrices both analyzed."""
    common = [k for k in ww if k in ours and ours[k] is not None and ww[k] not in (None, -1)]
    rel = [abs(ours[k] - ww[k]) / abs(ww[k]) for k in common]
    return {"compared": len(common), "max_rel_diff": max(rel) if rel else None}


def write_synthetic(folder: Path, layers: int, seed: int = 0) -> Path:
    """Llama-7B-shaped bf16 checkpoint, one shard per layer, with an index (module docstring).

    Each shard is written as soon as it is built, so memory stays about one layer.
    """
    import torch
    from safetensors.torch import save_file

    hidden, inter, vocab, rank = 4096, 11008, 32000, 16
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)

    def mat(m: int, n: int) -> torch.Tensor:
        w = torch.randn(m, n, generator=gen).mul_(0.02)
        u, v = torch.randn(m, rank, generator=gen), torch.randn(rank, n, generator=gen)
        return w.addmm_(u, v, alpha=2e-3).to(torch.bfloat16)

    def layer(i: int) -> dict[str, torch.Tensor]:
        p = f"model.layers.{i}."
        t = {p + f"self_attn.{x}_proj.weight": mat(hidden, hidden) for x in "qkvo"}
        t[p + "mlp.gate_proj.weight"] = mat(inter, hidden)
        t[p + "mlp.up_proj.weight"] = mat(inter, hidden)
        t[p + "mlp.down_proj.weight"] = mat(hidden, inter)
        t[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        return t

    builders = [lambda: {"model.embed_tokens.weight": mat(vocab, hidden)}]
    builders += [lambda i=i: layer(i) for i in range(layers)]
    builders += [lambda: {"lm_head.weight": mat(vocab, hidden)}]
    weight_map: dict[str, str] = {}
    for j, build in enumerate(builders):
        fname = f"model-{j + 1:05d}-of-{len(builders):05d}.safetensors"
        shard = build()
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
        del shard
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


JOBS = {  # name: (template, mp_fit, randomize); cmd*: the whole `spectra report` command
    "ours": (_OURS, False, False),
    "ours_mp": (_OURS, True, False),
    "ours_rand": (_OURS, False, True),
    "ww": (_WW, False, False),
    "ww_mp": (_WW, True, False),
    "ww_rand": (_WW, False, True),
    "cmd": ("", False, False),
    "cmd_cached": ("", False, False),
    "cmd_base": ("", False, False),
}


def bench_model(
    path: Path, threads: int, jobs: list[str], base_python: str | None = None
) -> dict[str, Any]:
    """The named JOBS on one checkpoint: wall and CPU seconds (CPU time is the fairer number
    on a shared machine), peak RSS, alpha agreement and the ratios that exist. Jobs run in the
    order given, so alternate them (`ww,cmd,ww,cmd`) for a side-by-side measurement; a job
    given twice keeps its last result and prints each."""
    res: dict[str, Any] = {"path": str(path)}
    for name in jobs:
        template, mp, rand = JOBS[name]
        if name == "cmd_base":
            if base_python is None:
                raise SystemExit("cmd_base needs --base-python")
            r = run_command(path, threads, cached=False, python=base_python)
        elif name.startswith("cmd"):
            r = run_command(path, threads, cached=name == "cmd_cached")
        else:
            r = run_job(template, path, threads, mp, rand)
        res.setdefault("runs", {}).setdefault(name, []).append(
            {k: v for k, v in r.items() if k != "alphas"}
        )
        res[name] = r
        print(
            f"  {name}: {r['time_s']:.2f} s wall, {r['cpu_s']:.2f} s CPU "
            f"(whole process {r['proc_cpu_s']:.2f} s), {r['rss_mb']:.0f} MB",
            flush=True,
        )
    if "ours" in res and "ww" in res:
        res["agreement"] = alpha_agreement(res["ours"]["alphas"], res["ww"]["alphas"])
        print(f"  alpha agreement {res['agreement']}", flush=True)
        for unit in ("time_s", "cpu_s"):
            res[f"speedup_{unit}"] = res["ww"][unit] / res["ours"][unit]
    for name in ("cmd", "cmd_cached", "cmd_base"):
        if name in res and "ww" in res:
            over_call = res[name]["proc_cpu_s"] / res["ww"]["cpu_s"]
            over_proc = res[name]["proc_cpu_s"] / res["ww"]["proc_cpu_s"]
            res[f"{name}_over_ww_call_cpu"], res[f"{name}_over_ww_process_cpu"] = (
                over_call,
                over_proc,
            )
            print(
                f"  {name} CPU / WeightWatcher analyze() CPU = {over_call:.2f}x; "
                f"/ WeightWatcher whole process = {over_proc:.2f}x",
                flush=True,
            )
    for name in jobs:
        base = "ours" if name.startswith("ours") else "ww"
        if name != base and base in res and not name.startswith("cmd"):
            for unit in ("time_s", "cpu_s"):
                res[f"{name}_over_{base}_{unit}"] = res[name][unit] / res[base][unit]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", type=Path, help="folder of the synthetic checkpoint")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--jobs", default="ours,ours_mp,ours_rand,ww", help=f"of {sorted(JOBS)}")
    ap.add_argument("--synthetic-jobs", default="ours,ww")
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument("--base-python", help="interpreter of another installation (cmd_base)")
    args = ap.parse_args()
    results: dict[str, Any] = {"threads": args.threads}
    if not args.skip_minilm:
        from spectra.sources.bundled import bundled_model_path

        print("MiniLM", flush=True)
        results["minilm"] = bench_model(
            bundled_model_path(), args.threads, args.jobs.split(","), args.base_python
        )
    if args.synthetic is not None:
        if not (args.synthetic / "model.safetensors.index.json").exists():
            t = time.perf_counter()
            write_synthetic(args.synthetic, args.layers)
            print(f"wrote {args.synthetic} in {time.perf_counter() - t:.0f} s", flush=True)
        print("synthetic", flush=True)
        jobs = args.synthetic_jobs.split(",")
        results["synthetic"] = bench_model(args.synthetic, args.threads, jobs)
    if args.json is not None:
        for r in results.values():
            if isinstance(r, dict):
                for v in r.values():
                    if isinstance(v, dict):
                        v.pop("alphas", None)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
