"""Peak memory of `spectra init --method pissa` and `spectra compare` on large matrices, against
PEFT's exact ``pissa`` on the same layers and against the process's fixed overhead.

Every measured command runs as its own child process; its peak RSS is the kernel's ``ru_maxrss``
for that child (``os.wait4``), so nothing of this script's own memory is counted.

- ``fixed``: the child imports what the command imports and returns (``spectra --help`` would not
  import torch): the fixed overhead every run pays (interpreter, torch, spectra).
- ``init``: a 7B-shaped Llama layer set (hidden 4096, intermediate 11008: q/k/v/o 4096 x 4096,
  gate/up 11008 x 4096, down 4096 x 11008), float32 on disk, low-rank-plus-noise weights (a rank-64
  product with decaying scales plus 1e-3 noise, so the top-16 subspace is well defined and the
  randomized route converges); ``spectra init --method pissa --rank 16`` on every matrix, and on
  ``up_proj`` alone (``--targets up``); other weight-only methods with ``--init-methods``
  (e.g. ``pissa,milora,olora``); PEFT ``get_peft_model(init_lora_weights="pissa")`` (exact
  full SVD) on the same model loaded with transformers (``--peft``; minutes of CPU per matrix;
  ``--peft-inits pissa,olora`` for other PEFT initializations).
- ``compare``: base and fine-tune each with a 32000 x 2048 embedding and lm_head (stored as
  ``--compare-dtypes``, bf16 and float32 by default; the fine-tune = base + a rank-8 update +
  1e-4 noise); ``spectra compare``. Each row also states compare's working memory of the
  largest pair (``compare_working_mib``: what compare holds for one pair by design, see
  spectra/analysis/pair.py) and the bound ``fixed + working`` the peak should stay under.
  ``--exe`` measures another installation's ``spectra`` (e.g. main's, for a before/after).

    python benchmarks/bench_memory.py --workdir /tmp/spectra-mem            # init + compare
    python benchmarks/bench_memory.py --workdir /tmp/spectra-mem --peft     # + PEFT's pissa
    python benchmarks/bench_memory.py --workdir /tmp/m --hidden 512 --inter 1376 --vocab 4000
    python benchmarks/bench_memory.py --workdir /tmp/m --what compare --exe /old/.venv/bin/spectra
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

LAYER = "model.layers.0."
SHAPES = {
    "self_attn.q_proj": ("h", "h"),
    "self_attn.k_proj": ("h", "h"),
    "self_attn.v_proj": ("h", "h"),
    "self_attn.o_proj": ("h", "h"),
    "mlp.gate_proj": ("i", "h"),
    "mlp.up_proj": ("i", "h"),
    "mlp.down_proj": ("h", "i"),
}


def _lowrank(m: int, n: int, gen: torch.Generator, rank: int = 64) -> torch.Tensor:
    scales = torch.logspace(0, -2, rank)
    left = torch.randn(m, rank, generator=gen) * scales / m**0.5
    W = left @ torch.randn(rank, n, generator=gen)
    return W.add_(torch.randn(m, n, generator=gen), alpha=1e-3)


def write_layer(folder: Path, hidden: int, inter: int) -> Path:
    """One Llama layer (see the module docstring) + config.json, reused when present."""
    if (folder / "model.safetensors").exists():
        return folder
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    dims = {"h": hidden, "i": inter}
    tensors = {
        f"{LAYER}{name}.weight": _lowrank(dims[a], dims[b], gen) for name, (a, b) in SHAPES.items()
    }
    tensors["model.embed_tokens.weight"] = torch.randn(64, hidden, generator=gen) * 0.02
    tensors[f"{LAYER}input_layernorm.weight"] = torch.ones(hidden)
    tensors[f"{LAYER}post_attention_layernorm.weight"] = torch.ones(hidden)
    tensors["model.norm.weight"] = torch.ones(hidden)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=1,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        vocab_size=64,
    ).save_pretrained(folder)
    return folder


DTYPES = {"bf16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def write_compare_pair(
    folder: Path, vocab: int, hidden: int, dtype: str = "float32"
) -> tuple[Path, Path]:
    """Base and fine-tune, each an embedding and an lm_head of (vocab, hidden) in `dtype`
    (made in float32, then rounded: the fine-tune's update survives bf16 rounding)."""
    tag = "" if dtype == "float32" else f"_{dtype}"
    base, ft = folder / f"base{tag}.safetensors", folder / f"ft{tag}.safetensors"
    if base.exists() and ft.exists():
        return base, ft
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    tensors = {
        "model.embed_tokens.weight": _lowrank(vocab, hidden, gen, rank=256),
        "lm_head.weight": _lowrank(vocab, hidden, gen, rank=256),
    }
    save_file({k: v.to(DTYPES[dtype]) for k, v in tensors.items()}, str(base))
    for name, W in tensors.items():
        update = torch.randn(vocab, 8, generator=gen) @ torch.randn(8, hidden, generator=gen)
        W.add_(update, alpha=1e-3).add_(torch.randn(vocab, hidden, generator=gen), alpha=1e-4)
        tensors[name] = W
    save_file({k: v.to(DTYPES[dtype]) for k, v in tensors.items()}, str(ft))
    return base, ft


def compare_working_mib(m: int, n: int, itemsize: int) -> float:
    """compare's stated working memory for one (m, n) pair (`pair_working_bytes`), MiB."""
    from spectra.analysis.pair import pair_working_bytes

    return pair_working_bytes((m, n), itemsize) / 2**20


def peak_of(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` as a child; its exit status, wall seconds and peak RSS (MiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "rc": proc.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_mib": round(usage.ru_maxrss / 1024, 1),
        "stderr": err.strip().splitlines()[-1:] if proc.returncode else [],
    }


FIXED = "import torch, spectra.jobs.init, spectra.jobs.compare, spectra.cli.main"
PEFT = """
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel
torch.set_num_threads({threads})
model = AutoModel.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
config = LoraConfig(r=16, lora_alpha=16, target_modules={targets!r}, init_lora_weights={init!r})
get_peft_model(model, config)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--embed", type=int, default=2048, help="compare: embedding width")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compare-dtypes", default="bf16,float32", help="stored dtypes of the pair")
    ap.add_argument("--init-methods", default="pissa", help="init: weight-only methods to run")
    ap.add_argument("--vocabs", default=None, help="compare: pair heights (default --vocab)")
    ap.add_argument(
        "--compare-cache", action="store_true", help="compare: also with --cache-dir, miss + hit"
    )
    ap.add_argument("--exe", default=None, help="the spectra executable (default: this venv's)")
    ap.add_argument("--what", default="init,compare")
    ap.add_argument("--peft", action="store_true", help="also PEFT's exact pissa (slow)")
    ap.add_argument("--peft-inits", default="pissa", help="PEFT init_lora_weights to run")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    exe = args.exe or str(Path(sys.executable).with_name("spectra"))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    out = args.workdir / "runs"
    rows: list[dict[str, Any]] = []

    def record(what: str, cmd: list[str], bound: str = "") -> None:
        load = os.getloadavg()[0]
        row = {"what": what, **peak_of(cmd, env), "load": [load, os.getloadavg()[0]]}
        rows.append(row)
        print(
            f"| {what} | {row['peak_mib']} | {bound} | {row['seconds']} | "
            f"{load:.1f}-{os.getloadavg()[0]:.1f} | {row['rc']} {' '.join(row['stderr'])} |",
            flush=True,
        )

    print(
        f"# {platform.machine()}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}, "
        f"{args.threads} thread(s), {exe}\n\n"
        "| run | peak RSS MiB | fixed + working MiB | seconds | load | rc |\n"
        "|---|---:|---:|---:|---|---:|"
    )
    record("fixed: python + torch + spectra imports", [sys.executable, "-c", FIXED])
    wanted = args.what.split(",")
    if "init" in wanted:
        layer = write_layer(
            args.workdir / f"llama_{args.hidden}_{args.inter}", args.hidden, args.inter
        )
        for method in filter(None, args.init_methods.split(",")):
            common = ["--method", method, "--rank", "16", "--device", "cpu", "--force"]
            record(
                f"spectra init {method}, 7 matrices {args.hidden}/{args.inter}",
                [exe, "init", str(layer), *common, "--out", str(out / "init_all")],
            )
            up = ["--targets", "up", "--out", str(out / "init_up")]
            record(f"spectra init {method}, up_proj only", [exe, "init", str(layer), *common, *up])
        for init in args.peft_inits.split(",") if args.peft else ():
            names = [n.split(".")[-1] for n in SHAPES]
            script = PEFT.format(threads=args.threads, targets=names, init=init)
            record(f"PEFT {init}, 7 matrices", [sys.executable, "-c", script, str(layer)])
            script = PEFT.format(threads=args.threads, targets=["up_proj"], init=init)
            record(f"PEFT {init}, up_proj only", [sys.executable, "-c", script, str(layer)])
    fixed = rows[0]["peak_mib"]
    if "compare" in wanted:  # the command's own fixed cost: a 64 x 32 pair, plots and all
        base, ft = write_compare_pair(args.workdir / "pair_64", 64, 32)
        record(
            "fixed: spectra compare on a 64 x 32 pair",
            [exe, "compare", str(base), str(ft), "--out", str(out / "compare"), "--force"],
        )
        fixed = rows[-1]["peak_mib"]
    vocabs = [int(v) for v in (args.vocabs or str(args.vocab)).split(",")]
    runs = [(v, d) for v in vocabs for d in args.compare_dtypes.split(",")]
    for vocab, dtype in runs if "compare" in wanted else ():
        base, ft = write_compare_pair(args.workdir / f"pair_{vocab}", vocab, args.embed, dtype)
        working = compare_working_mib(vocab, args.embed, DTYPES[dtype].itemsize)
        cmd = [exe, "compare", str(base), str(ft), "--out", str(out / "compare"), "--force"]
        bound = f"{fixed:.0f} + {working:.0f} = {fixed + working:.0f}"
        what = f"spectra compare, embed + lm_head {vocab} x {args.embed} {dtype}"
        record(what, cmd, bound=bound)
        if args.compare_cache:  # a fresh cache folder: the first run stores U, the second reads
            cache = ["--cache-dir", str(args.workdir / f"cache_{vocab}_{dtype}")]
            shutil.rmtree(cache[1], ignore_errors=True)
            record(f"{what}, --cache-dir (miss: U stored)", [*cmd, *cache], bound=bound)
            record(f"{what}, --cache-dir (hit: U read)", [*cmd, *cache], bound=bound)
            shutil.rmtree(cache[1], ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
