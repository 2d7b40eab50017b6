"""Read a generated quantized checkpoint (>= 2 GB by default) and report peak RSS.

    .venv/bin/python benchmarks/bench_quantized.py [--scheme gptq|fp8] [--gb 2.2] [--dir D]

Writes a sharded Llama-7B-width checkpoint (4096 / 11008) in the chosen scheme once (kept for
reruns): GPTQ 4-bit group 128 (qweight/qzeros/scales/g_idx, random codes) or fp8 with 128 x 128
block scales (DeepSeek layout). Then, in a fresh subprocess, opens it, decodes every matrix to
float32 in shard order (holding one at a time, as the engine's reads do) and, separately,
computes the top-8 singular values of every matrix through the engine with a 1 GB batch budget
(randomized: the read and decode path dominates, as in a report); prints size, matrices,
largest decoded matrix, times and the peak RSS (VmHWM) of each pass. Not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTER = 4096, 11008
SHAPES = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}
BYTES_PER_WEIGHT = {"gptq": 0.5, "fp8": 1.0}


def _gptq(out: int, cols: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    groups = cols // 128
    words = torch.randint(-(2**31), 2**31 - 1, (cols // 8, out), generator=g, dtype=torch.int32)
    zeros = torch.full((groups, out // 8), 0x77777777, dtype=torch.int32)  # z - 1 = 7: z = 8
    scales = (torch.rand(groups, out, generator=g) * 0.01 + 0.001).to(torch.float16)
    g_idx = (torch.arange(cols) // 128).to(torch.int32)
    return {"qweight": words, "qzeros": zeros, "scales": scales, "g_idx": g_idx}


def _fp8(out: int, cols: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    codes = (torch.randn(out, cols, generator=g) * 100).to(torch.float8_e4m3fn)
    scale = torch.rand(-(-out // 128), -(-cols // 128), generator=g) * 1e-3
    return {"weight": codes, "weight_scale_inv": scale}


def write_checkpoint(folder: Path, scheme: str, gb: float) -> Path:
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    per_layer = BYTES_PER_WEIGHT[scheme] * sum(r * c for r, c in SHAPES.values())
    layers = max(1, int(gb * 1e9 / per_layer + 0.999))
    make = {"gptq": _gptq, "fp8": _fp8}[scheme]
    weight_map: dict[str, str] = {}
    g = torch.Generator().manual_seed(0)
    for i in range(layers):
        name = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        t: dict[str, torch.Tensor] = {}
        for module, (rows, cols) in SHAPES.items():
            for part, value in make(rows, cols, g).items():
                t[f"model.layers.{i}.{module}.{part}"] = value
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(HIDDEN).bfloat16()
        save_file(t, str(folder / name))
        weight_map.update(dict.fromkeys(t, name))
        del t
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    qc = (
        {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}
        if scheme == "gptq"
        else {"quant_method": "fp8", "weight_block_size": [128, 128]}
    )
    config = {"model_type": "llama", "hidden_size": HIDDEN, "quantization_config": qc}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def child(folder: str, mode: str) -> dict[str, float]:
    """One pass in a fresh process: `read` (decode every matrix) or `engine` (all spectra)."""
    from spectra.linalg.decompose import SpectrumOptions
    from spectra.linalg.engine import EngineOptions, compute_spectra
    from spectra.sources.checkpoint import Checkpoint

    base = _vm("VmRSS")
    t0 = time.perf_counter()
    with Checkpoint.open(folder) as ckpt:
        mats = ckpt.matrices()
        if mode == "read":
            for _, w in ckpt.read_many(mats):
                del w
        else:
            engine = EngineOptions(device="cpu", max_memory=1 << 30, prefetch=False)
            opts = SpectrumOptions(mode="topk", k=8)  # the read path is what is measured
            for _ in compute_spectra(ckpt, mats, opts, engine=engine):
                pass
        size = sum(f.stat().st_size for f in ckpt.files)
        largest = max(m.numel for m in mats) * 4
    return {
        "bytes": size,
        "files": len(ckpt.files),
        "matrices": len(mats),
        "largest_f32": largest,
        "seconds": time.perf_counter() - t0,
        "peak_rss_kib": _vm("VmHWM"),
        "rss_before_kib": base,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", choices=sorted(BYTES_PER_WEIGHT), default="gptq")
    ap.add_argument("--gb", type=float, default=2.2)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--passes", default="read,engine")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    folder = args.dir or Path(f"/tmp/spectra-bench-{args.scheme}")
    folder = write_checkpoint(folder / args.scheme, args.scheme, args.gb)
    for mode in args.passes.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(folder), mode],
            check=True,
            capture_output=True,
            text=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows = [
            ("pass", f"{mode} ({args.scheme})"),
            (
                "checkpoint",
                f"{r['bytes'] / 1e9:.2f} GB in {r['files']} shards, {r['matrices']} matrices",
            ),
            ("largest decoded", f"{r['largest_f32'] / 2**20:.0f} MiB float32"),
            ("time", f"{r['seconds']:.1f} s ({r['bytes'] / 1e9 / r['seconds']:.3f} GB/s stored)"),
            ("RSS after imports", f"{r['rss_before_kib'] / 1024:.0f} MiB"),
            ("peak RSS", f"{r['peak_rss_kib'] / 1024:.0f} MiB"),
        ]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
        print()


if __name__ == "__main__":
    main()
