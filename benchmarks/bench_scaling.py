"""Single-process throughput of the engine, and the wall-time model of docs/scaling.md.

Measures, on this machine, with a fixed per-process thread count (torchrun's default is 1):
- read: `Checkpoint.read_many` over every matrix of a synthetic Llama-shaped bf16 checkpoint
  (bf16 -> float32; warm page cache, so this is memory + conversion speed, not storage);
- values: `compute_spectra` with `SpectrumOptions(mode="values")` (float64 Gram eigenvalues,
  the report's default);
- topk: `SpectrumOptions(mode="topk", k=64)` (block Krylov, converged).
Each as matrices/s, GB/s of checkpoint bytes, and the effective rate of the cost model's flops
(`spectra.distributed.CostModel`: m*n*min(m,n) for a full spectrum, 2*m*n*(k+p)*(2q+2) for top-k).

Then it projects wall times for Llama-3-8B, Llama-3-70B and a 400B MoE (Llama-4-Maverick-like
layout; shapes stated below) on N processes: compute = model flops / (rate * N), I/O floor =
bytes / storage bandwidth. The CPU rows use the measured rates; the GPU rows use ASSUMED rates
(constants below), which are assumptions, not measurements.

    .venv/bin/python benchmarks/bench_scaling.py [--threads 1] [--scale 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from spectra.distributed.partition import CostModel
from spectra.linalg.decompose import SpectrumOptions
from spectra.linalg.engine import EngineOptions, compute_spectra
from spectra.sources.checkpoint import Checkpoint

# ASSUMPTIONS (not measured: no GPU on the machine that wrote docs/scaling.md). Effective "model
# flops" per second (the CostModel's flop counts divided by wall time) of one H100 on this
# engine's work:
# - values (float64 Gram product + eigvalsh): the Gram product is fast (FP64 tensor cores), but
#   cuSOLVER's dense symmetric eigensolver is latency-bound; we assume ~0.3 s for one float64
#   4096 x 4096 eigvalsh, i.e. 4096^3 / 0.3 s ~ 2.5e11 model flops/s.
# - topk (float32 block Krylov): skinny matmuls near FP32 peak plus small QRs; we assume ~13 ms
#   for a 14336 x 4096 matrix at k = 64 (ten passes over W), i.e. ~5e12 model flops/s.
GPU_VALUES_FLOPS = 2.5e11
GPU_TOPK_FLOPS = 5e12
STORAGE = {"local NVMe (per node)": 3e9, "parallel FS (per node)": 1e9}


@dataclass(frozen=True)
class Layout:
    """A transformer's weight matrices as (shape, count) pairs; 2 bytes per weight (bf16)."""

    name: str
    mats: tuple[tuple[tuple[int, int], int], ...]

    @property
    def count(self) -> int:
        return sum(c for _, c in self.mats)

    @property
    def nbytes(self) -> int:
        return sum(2 * m * n * c for (m, n), c in self.mats)

    def flops(self, model: CostModel) -> float:
        return sum(model.flops(shape) * c for shape, c in self.mats)


def llama(name: str, hidden: int, inter: int, kv: int, layers: int, vocab: int) -> Layout:
    per_layer = (
        ((hidden, hidden), 2 * layers),  # q, o
        ((kv, hidden), 2 * layers),  # k, v
        ((inter, hidden), 2 * layers),  # gate, up
        ((hidden, inter), layers),  # down
    )
    return Layout(name, (*per_layer, ((vocab, hidden), 2)))  # embed, lm_head


LAYOUTS = (
    llama("Llama-3-8B", 4096, 14336, 1024, 32, 128256),
    llama("Llama-3-70B", 8192, 28672, 1024, 80, 128256),
    Layout(  # 48 layers, hidden 5120, kv 1024; 24 MoE layers x (128 experts + 1 shared) x 8192,
        # 24 dense layers x 16384; vocab 202048. About 400B parameters.
        "400B MoE",
        (
            ((5120, 5120), 96),
            ((1024, 5120), 96),
            ((8192, 5120), 2 * 24 * 129),
            ((5120, 8192), 24 * 129),
            ((16384, 5120), 2 * 24),
            ((5120, 16384), 24),
            ((202048, 5120), 2),
        ),
    ),
)


def write_checkpoint(folder: Path, scale: int) -> Path:
    """A 2-layer Llama-3-8B-shaped bf16 checkpoint with every dimension divided by `scale`."""
    g = torch.Generator().manual_seed(0)
    h, inter, kv = 4096 // scale, 14336 // scale, 1024 // scale
    tensors = {}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj": (h, h),
            "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h),
            "mlp.gate_proj": (inter, h),
            "mlp.up_proj": (inter, h),
            "mlp.down_proj": (h, inter),
        }
        for name, shape in shapes.items():
            w = torch.randn(*shape, generator=g) * 0.02
            tensors[p + name + ".weight"] = w.to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def measure(folder: Path) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    with Checkpoint.open(folder) as ck:
        refs = ck.matrices()
        nbytes = sum(r.nbytes for r in refs)
        shapes = [tuple(r.shape) for r in refs]
        for _ in ck.read_many(refs):  # warm the page cache once
            pass
        t0 = time.perf_counter()
        for _ in ck.read_many(refs):
            pass
        out["read"] = _rates(time.perf_counter() - t0, len(refs), nbytes, 0.0)
        for mode, model in (("values", CostModel()), ("topk", CostModel(mode="topk", k=64))):
            t0 = time.perf_counter()
            options = SpectrumOptions(mode=mode, k=64 if mode == "topk" else None)
            cpu = EngineOptions(device="cpu")
            specs = list(compute_spectra(ck, refs, options, engine=cpu, cache=None))
            seconds = time.perf_counter() - t0
            assert all(s.ok for s in specs)
            flops = sum(model.flops(s) for s in shapes)
            out[mode] = _rates(seconds, len(refs), nbytes, flops)
    return out


def _rates(seconds: float, count: int, nbytes: int, flops: float) -> dict[str, float]:
    return {
        "seconds": seconds,
        "matrices_per_s": count / seconds,
        "GB_per_s": nbytes / seconds / 1e9,
        "model_flops_per_s": flops / seconds,
    }


def _fmt(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def projection(measured: dict[str, dict[str, float]]) -> list[str]:
    """Markdown rows: model, setting, bytes, flops, then wall times for several N."""
    rows = [
        "| model | matrices | GB (bf16) | setting | TFLOP (model) | 1 CPU proc (measured rate) "
        "| 1 GPU* | 8 GPUs* | 64 GPUs* | I/O floor, 1 node NVMe 3 GB/s | 8 nodes, FS 1 GB/s each |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lay in LAYOUTS:
        for mode, model, gpu in (
            ("values", CostModel(), GPU_VALUES_FLOPS),
            ("topk", CostModel(mode="topk", k=64), GPU_TOPK_FLOPS),
        ):
            flops = lay.flops(model)
            cpu = flops / measured[mode]["model_flops_per_s"]
            io1 = lay.nbytes / STORAGE["local NVMe (per node)"]
            io8 = lay.nbytes / (8 * STORAGE["parallel FS (per node)"])
            label = "full spectrum" if mode == "values" else "top-64"
            rows.append(
                f"| {lay.name} | {lay.count} | {lay.nbytes / 1e9:.0f} | {label} | "
                f"{flops / 1e12:,.0f} | {_fmt(cpu)} | {_fmt(flops / gpu)} | "
                f"{_fmt(flops / gpu / 8)} | {_fmt(flops / gpu / 64)} | {_fmt(io1)} | {_fmt(io8)} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (torchrun: 1)")
    parser.add_argument("--scale", type=int, default=4, help="divide Llama-3-8B dims by this")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        measured = measure(write_checkpoint(Path(tmp) / "ck", args.scale))
    print(f"threads={args.threads} scale=1/{args.scale} (2 layers, 14 matrices, bf16)")
    for name, r in measured.items():
        print(
            f"{name:7s} {r['seconds']:7.2f} s  {r['matrices_per_s']:7.2f} matrices/s  "
            f"{r['GB_per_s']:6.3f} GB/s  {r['model_flops_per_s'] / 1e9:7.2f} GFLOP/s (model)"
        )
    print()
    print("\n".join(projection(measured)))
    if args.json is not None:
        args.json.write_text(json.dumps({"threads": args.threads, "measured": measured}, indent=2))


if __name__ == "__main__":
    main()
