"""`spectra plan` cost: cold (no cache) against `spectra report`, and warm (from the cache a
report filled) for every kind; optionally the reference tool cognitivecomputations/spectrum run
on the bundled MiniLM against `--for spectrum`.

    .venv/bin/python benchmarks/bench_plan.py [--hidden 2048] [--inter 5632] [--layers 22]
        [--vocab 32000] [--dir /tmp/spectra-bench-plan] [--threads 1]
        [--steps report,cold,warm]
        [--spectrum-repo PATH]   # a checkout of cognitivecomputations/spectrum (spectrum.py)

Writes a synthetic Llama-shaped bf16 checkpoint under --dir (kept for reruns; the defaults are
TinyLlama-1.1B's widths and depth, with full-width k/v projections instead of its grouped-query
256-row ones: 1.26e9 parameters, 2.5 GB), then runs the `spectra` commands, each in its own
process (the costs a user's command has, imports and writing included), with --threads and
OMP_NUM_THREADS set to --threads:
1. report: `spectra report` with an empty cache (WORK/cache-report): the report's cold cost;
2. cold: `spectra plan --for spectrum` with another empty cache (WORK/cache-plan), then the
   other kinds from that cache;
3. warm: every kind from the cache step 1 filled (peft with the energy allocator).
Prints one row per command as it ends: wall seconds, CPU seconds (user + system, all threads)
and peak RSS, from os.wait4. WORK is --dir/work; the commands' output goes to
WORK/bench_plan.log. Not a test: numbers depend on the machine and its load.

With `--spectrum-repo`, imports that checkout's `spectrum.py` (its interactive `prompt_toolkit`
dialogs stubbed out: never called), scans every weight of the bundled MiniLM with its
`ModelModifier` (loaded as `transformers.AutoModel`, float32), writes its JSON and YAML in a
scratch folder and compares them with `spectra plan --for spectrum`: the largest relative SNR
difference over the 2-D matrices and whether the YAML lists the same modules per type.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from spectra.jobs.plan import KINDS, PlanOptions, make_plan
from spectra.sources.bundled import bundled_model_path

#: The cold pass: spectrum first (its cold cost), then the other kinds from its cache.
KINDS_COLD_FIRST = ("spectrum", *(k for k in KINDS if k != "spectrum"))


def _spiky(shape: tuple[int, int], g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Gaussian entries with one in 10^4 made 40x larger: weight outliers for OwLore's ratio."""
    w = torch.randn(*shape, generator=g) * scale
    idx = torch.randint(w.numel(), (max(1, w.numel() // 10_000),), generator=g)
    w.view(-1)[idx] *= 40.0
    return w.bfloat16()


def write_checkpoint(folder: Path, hidden: int, inter: int, layers: int, vocab: int) -> Path:
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shards = layers + 1
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        if i == layers:
            t = {
                "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g).bfloat16(),
                "model.norm.weight": torch.ones(hidden).bfloat16(),
                "lm_head.weight": torch.randn(vocab, hidden, generator=g).bfloat16(),
            }
        else:
            p = f"model.layers.{i}."
            t = {
                p + f"self_attn.{k}.weight": _spiky((hidden, hidden), g, hidden**-0.5)
                for k in ("q_proj", "k_proj", "v_proj", "o_proj")
            }
            for k, shape in (("gate", (inter, hidden)), ("up", (inter, hidden))):
                t[p + f"mlp.{k}_proj.weight"] = _spiky(shape, g)
            t[p + "mlp.down_proj.weight"] = _spiky((hidden, inter), g)
            t[p + "input_layernorm.weight"] = torch.ones(hidden).bfloat16()
        save_file(t, str(folder / name))
        weight_map.update(dict.fromkeys(t, name))
    body = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(body))
    return folder


@dataclass(frozen=True)
class Row:
    step: str
    wall: float
    cpu: float
    rss_mib: float


def _spectra_exe() -> str:
    exe = Path(sys.executable).with_name("spectra")
    return str(exe) if exe.is_file() else "spectra"


# Runs argv[2:] as a grandchild and writes its wall, CPU and peak RSS to argv[1]. Linux starts a
# process's peak RSS (ru_maxrss) at its parent's RSS when it is forked from a large process (the
# exec keeps the high-water mark of the forked copy): a command started straight from this process,
# which holds the generated checkpoint's tensors, read ~1 GB whatever it did. The small launcher
# forks the command from its own ~10 MB interpreter, so the figure is the command's own.
_LAUNCHER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
cpu, rss = ru.ru_utime + ru.ru_stime, ru.ru_maxrss
with open(sys.argv[1], "w") as fh:
    json.dump({"wall": wall, "cpu": cpu, "rss_kib": rss}, fh)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_cli(step: str, args: list[str], threads: int, log: Path) -> Row:
    """One `spectra` command in its own process: wall seconds, CPU seconds (user + system of that
    process and its threads) and its peak RSS, from os.wait4 in a small launcher process."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    usage = log.with_name(f"{log.stem}.usage.json")
    with log.open("ab") as fh:
        fh.write(f"\n$ spectra {' '.join(args)}\n".encode())
        fh.flush()
        cmd = [sys.executable, "-c", _LAUNCHER, str(usage), _spectra_exe(), *args]
        code = subprocess.run(cmd, stdout=fh, stderr=fh, env=env, check=False).returncode
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-5:]
        raise SystemExit(f"{step}: exit {code}\n" + "\n".join(tail))
    got = json.loads(usage.read_text())
    return Row(step, got["wall"], got["cpu"], got["rss_kib"] / 1024)


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    return folder


def _kind_args(kind: str, out: Path) -> list[str]:
    target = out / (kind if kind == "peft" else f"{kind}.json")
    extra = ["--allocate", "energy"] if kind == "peft" else []
    return ["--for", kind, "--out", str(target), "--force", *extra]


def bench(
    ckpt: Path, work: Path, threads: int, steps: Sequence[str], show: Callable[[Row], None]
) -> list[Row]:
    """Steps (each its own process, in this order):
    report: `spectra report` with an empty cache (work/cache-report), the report's cold cost;
    cold: `spectra plan --for spectrum` with another empty cache (work/cache-plan), then the
      other kinds from that cache (a cold plan, then the rest warm from the plan's own cache);
    warm: every kind from the cache the report filled (run `report` first, now or before)."""
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        show(row)

    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench_plan.log"
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    common = ["--threads", str(threads), "--quiet"]
    if "report" in steps:
        cache = _fresh(work / "cache-report")
        report = ["report", str(ckpt), "--out", str(_fresh(out / "report"))]
        add(run_cli("report, cold", [*report, "--cache-dir", str(cache), *common], threads, log))
    if "cold" in steps:
        cache = _fresh(work / "cache-plan")
        for i, kind in enumerate(KINDS_COLD_FIRST):
            args = ["plan", str(ckpt), *_kind_args(kind, out), "--cache-dir", str(cache)]
            label = f"plan --for {kind}, " + ("cold" if i == 0 else "after the cold plan")
            add(run_cli(label, [*args, *common], threads, log))
    if "warm" in steps:
        cache = work / "cache-report"
        if not cache.is_dir():
            raise SystemExit(f"no report cache at {cache}: run --steps report first")
        for kind in KINDS:
            args = ["plan", str(ckpt), *_kind_args(kind, out), "--cache-dir", str(cache)]
            add(run_cli(f"plan --for {kind}, warm", [*args, *common], threads, log))
    return rows


def compare_with_spectrum_tool(repo: Path, scratch: Path) -> dict[str, object]:
    """Run the reference tool's scan on MiniLM and compare with spectra's plan."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    stub = types.ModuleType("prompt_toolkit")
    shortcuts = types.ModuleType("prompt_toolkit.shortcuts")
    shortcuts.checkboxlist_dialog = shortcuts.input_dialog = None  # type: ignore[attr-defined]
    sys.modules.setdefault("prompt_toolkit", stub)
    sys.modules.setdefault("prompt_toolkit.shortcuts", shortcuts)
    sys.path.insert(0, str(repo))
    import spectrum as tool  # the reference checkout's spectrum.py

    minilm = bundled_model_path()
    modifier = tool.ModelModifier(top_percent=50)
    modifier.model = AutoModel.from_pretrained(minilm, torch_dtype=torch.float32)
    modifier.model_name = "minilm"
    here = Path.cwd()
    work = scratch / "tool"
    work.mkdir(exist_ok=True)
    os.chdir(work)
    try:
        t0 = time.perf_counter()
        modifier.assess_layers_snr(modifier.sort_weight_types(modifier.get_weight_types()))
        tool_seconds = time.perf_counter() - t0
        modifier.save_snr_to_json()
        tool_json = json.loads((work / "model_snr_results" / "snr_results_minilm.json").read_text())
        tool_yaml = (work / "snr_results_minilm_unfrozenparameters_50percent.yaml").read_text()
    finally:
        os.chdir(here)
    result = make_plan(
        minilm, PlanOptions(kind="spectrum", out=scratch / "mine.json", force=True), cache=False
    )
    make_plan(minilm, PlanOptions(kind="spectrum", out=scratch / "mine.yaml"), cache=False)
    mine = {row["module"]: row["snr"] for row in result.plan["modules"]}
    rel = max(abs(mine[m] - tool_json[m]["snr"]) / abs(tool_json[m]["snr"]) for m in mine)
    groups: dict[str, list[str]] = {}
    current = None
    for line in tool_yaml.splitlines():
        if line.startswith("# "):
            current = line[2 : -len(" layers")]
            groups[current] = []
        elif line.startswith("- ") and current is not None:
            groups[current].append(line[2:])
    ours = {t["type"]: t["chosen"] for t in result.plan["types"]}
    same = all(groups.get(t) == chosen for t, chosen in ours.items())
    kept = [
        line
        for t, chosen in groups.items()
        if t in ours
        for line in (f"# {t} layers", *(f"- {m}" for m in chosen))
    ]
    ours_yaml = (scratch / "mine.yaml").read_text().split("\n# spectra plan")[0].splitlines()
    yaml_equal = tool_yaml.splitlines()[:3] + kept == ours_yaml
    return {
        "modules compared": len(mine),
        "max relative SNR difference": rel,
        "types compared": len(ours),
        "same modules chosen per type (and same order)": same,
        "YAML text equal (tool-only groups dropped first, if any)": yaml_equal,
        "tool-only types (1-D weights)": sorted(set(groups) - set(ours)),
        "tool scan seconds": round(tool_seconds, 2),
    }


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "spectra-bench-plan")
    ap.add_argument("--threads", type=int, default=1, help="--threads of every command")
    ap.add_argument(
        "--steps",
        default="report,cold,warm",
        help="comma-separated subset of report,cold,warm (see bench(); warm reads the cache "
        "that report filled, in this run or an earlier one with the same --dir)",
    )
    ap.add_argument("--spectrum-repo", type=Path, default=None)
    ap.add_argument("--reference-only", action="store_true", help="skip the timing table")
    args = ap.parse_args()
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if unknown := set(steps) - {"report", "cold", "warm"}:
        raise SystemExit(f"--steps: unknown {sorted(unknown)}; give report, cold and/or warm")
    torch.set_num_threads(args.threads)
    name = f"llama-{args.hidden}-{args.inter}-{args.layers}-{args.vocab}"
    ckpt = args.dir / name
    params = args.layers * (4 * args.hidden**2 + 3 * args.hidden * args.inter)
    params += 2 * args.vocab * args.hidden
    if not args.reference_only:
        write_checkpoint(ckpt, args.hidden, args.inter, args.layers, args.vocab)
        print(f"checkpoint {name}: {params / 1e9:.2f}e9 parameters (bf16), {args.threads} threads")
        print(f"start: {_load()}", flush=True)
        print(f"{'step':<44} {'wall s':>8} {'CPU s':>8} {'peak RSS MiB':>13}", flush=True)
        bench(ckpt, args.dir / "work", args.threads, steps, _print_row)
        print(f"end: {_load()}", flush=True)
    if args.spectrum_repo is not None:
        with tempfile.TemporaryDirectory() as tmp:
            print("\ncognitivecomputations/spectrum on the bundled MiniLM:")
            for key, value in compare_with_spectrum_tool(args.spectrum_repo, Path(tmp)).items():
                print(f"  {key}: {value}")


def _print_row(row: Row) -> None:
    print(f"{row.step:<44} {row.wall:>8.1f} {row.cpu:>8.1f} {row.rss_mib:>13.0f}", flush=True)


if __name__ == "__main__":
    main()
