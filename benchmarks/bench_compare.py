"""Benchmark `spectra compare`: two synthetic checkpoints, and a LoRA adapter against its base.

Builds a Llama-shaped synthetic base (bf16; q/k/v/o hidden x hidden, gate/up/down hidden x inter),
a full-fine-tune-like checkpoint (base + small dense noise on every matrix) and a PEFT LoRA adapter
(rank r on every matrix), then times, each phase in a fresh process (so peak RSS is its own):
  read   reading every base matrix (the floor any comparison pays),
  full   compare(base, finetuned),
  lora   compare(base, adapter) with a cold base-SVD cache,
  warm   the same with the cache filled by `lora` (what a second fine-tune of that base costs).

    python benchmarks/bench_compare.py --workdir /tmp/bench --hidden 1024 --inter 2816 --layers 4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def shapes(hidden: int, inter: int, layers: int) -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        for r in "qkvo":
            out[f"{p}self_attn.{r}_proj.weight"] = (hidden, hidden)
        out[f"{p}mlp.gate_proj.weight"] = (inter, hidden)
        out[f"{p}mlp.up_proj.weight"] = (inter, hidden)
        out[f"{p}mlp.down_proj.weight"] = (hidden, inter)
    return out


def build(work: Path, hidden: int, inter: int, layers: int, rank: int) -> int:
    """Write base/, finetuned/ and adapter/ under `work`; return the parameter count."""
    g = torch.Generator().manual_seed(0)
    shp = shapes(hidden, inter, layers)
    base, ft, adapter = {}, {}, {}
    for key, (m, n) in shp.items():
        w = torch.randn(m, n, generator=g) * 0.02
        base[key] = w.to(torch.bfloat16)
        ft[key] = (w + 1e-3 * torch.randn(m, n, generator=g)).to(torch.bfloat16)
        mod = key.removesuffix(".weight")
        adapter[f"base_model.model.{mod}.lora_A.weight"] = torch.randn(rank, n, generator=g) * 0.01
        adapter[f"base_model.model.{mod}.lora_B.weight"] = torch.randn(m, rank, generator=g) * 0.01
    for name, tensors in (("base", base), ("finetuned", ft)):
        (work / name).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(work / name / "model.safetensors"))
    (work / "adapter").mkdir(exist_ok=True)
    save_file(adapter, str(work / "adapter" / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": []}
    (work / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    return sum(m * n for m, n in shp.values())


def _peak_rss_mb() -> float:
    """Peak RSS of this process image: VmHWM (Linux). ru_maxrss survives execve, so in a child it
    would report the parent's RSS at fork time (here: the 2 x 2 GB of built checkpoints)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase(name: str, work: Path, threads: int) -> dict:
    """Run one phase in this process; return time and peak RSS."""
    torch.set_num_threads(threads)
    from spectra.analysis.comparison import CompareOptions
    from spectra.jobs.compare import compare
    from spectra.sources.checkpoint import Checkpoint

    t0 = time.perf_counter()
    extra: dict = {}
    if name == "read":
        with Checkpoint.open(work / "base") as ck:
            total = sum(ck.read(m).numel() for m in ck.matrices())
        extra["numel"] = total
    else:
        ft = work / ("finetuned" if name == "full" else "adapter")
        cache = None if name == "full" else work / "cache"
        cmp = compare(
            work / "base", ft, CompareOptions(k=10, epsilons=(0.5, 0.9), device="cpu"), cache=cache
        )
        f = cmp.forensics
        extra = {
            "pairs": len(cmp.pairs),
            "update_kind": f.update_kind,
            "apparent_rank": f.apparent_rank,
            "intruders": f.intruders_total,
        }
    seconds = time.perf_counter() - t0
    peak_mb = _peak_rss_mb()
    return {"phase": name, "seconds": round(seconds, 2), "peak_rss_mb": round(peak_mb), **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--phase", choices=("read", "full", "lora", "warm"))
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.workdir, args.threads)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    params = build(args.workdir, args.hidden, args.inter, args.layers, args.rank)
    print(
        f"built 2 x {params / 1e6:.1f}M-parameter bf16 checkpoints + rank-{args.rank} adapter "
        f"in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    for name in ("read", "full", "lora", "warm"):
        cmd = [
            sys.executable,
            __file__,
            "--workdir",
            str(args.workdir),
            "--phase",
            name,
            "--threads",
            str(args.threads),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
