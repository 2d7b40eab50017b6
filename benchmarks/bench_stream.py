"""Stream a generated sharded bf16 checkpoint (>= 2 GB by default) and report peak RSS.

    .venv/bin/python benchmarks/bench_stream.py [--gb 2.2] [--dir /tmp/spectra-bench]

Writes the checkpoint once (kept for reruns), then in a fresh subprocess opens it, reads every
matrix as float32 in shard order (holding one at a time) and prints a table: size, tensors,
largest tensor, time, throughput, and peak RSS (VmHWM) of the reading process. Not a test.
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

HIDDEN, INTER = 4096, 11008  # Llama-7B widths: a 4096 x 11008 bf16 matrix is 90 MB


def write_checkpoint(folder: Path, gb: float) -> Path:
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    per_layer = 2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER)
    layers = max(1, int(gb * 1e9 / per_layer + 0.999))
    weight_map: dict[str, str] = {}
    g = torch.Generator().manual_seed(0)
    for i in range(layers):
        name = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        p = f"model.layers.{i}."
        t = {
            p + f"self_attn.{k}.weight": torch.randn(HIDDEN, HIDDEN, generator=g).bfloat16()
            for k in ("q_proj", "k_proj", "v_proj", "o_proj")
        }
        t[p + "mlp.gate_proj.weight"] = torch.randn(INTER, HIDDEN, generator=g).bfloat16()
        t[p + "mlp.up_proj.weight"] = torch.randn(INTER, HIDDEN, generator=g).bfloat16()
        t[p + "mlp.down_proj.weight"] = torch.randn(HIDDEN, INTER, generator=g).bfloat16()
        t[p + "input_layernorm.weight"] = torch.ones(HIDDEN).bfloat16()
        save_file(t, str(folder / name))
        weight_map.update(dict.fromkeys(t, name))
        del t
    body = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(body))
    return folder


def _vm(field: str) -> int:
    """A /proc/self/status memory field in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def stream(folder: str) -> dict[str, float]:
    """Runs in the child: open, read every matrix, report."""
    from spectra.sources.checkpoint import Checkpoint

    base = _vm("VmRSS")
    t0 = time.perf_counter()
    checksum = 0.0
    with Checkpoint.open(folder) as ckpt:
        mats = ckpt.matrices()
        for _, w in ckpt.read_many(mats):
            checksum += float(w[0, 0])
            del w
        size = sum(f.stat().st_size for f in ckpt.files)
        largest = max(m.nbytes for m in mats)
    dt = time.perf_counter() - t0
    peak = _vm("VmHWM")  # peak RSS of this process image (ru_maxrss would include the parent's)
    return {
        "bytes": size,
        "files": len(ckpt.files),
        "matrices": len(mats),
        "largest": largest,
        "seconds": dt,
        "peak_rss_kib": peak,
        "rss_before_kib": base,
        "checksum": checksum,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.2)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/spectra-bench-stream"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(stream(args.child)))
        return
    folder = write_checkpoint(args.dir, args.gb)
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(folder)],
        check=True,
        capture_output=True,
        text=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    rows = [
        (
            "checkpoint",
            f"{r['bytes'] / 1e9:.2f} GB in {r['files']} shards, {r['matrices']} matrices (bf16)",
        ),
        (
            "largest matrix",
            f"{r['largest'] / 1e6:.0f} MB bf16 -> {2 * r['largest'] / 1e6:.0f} MB float32",
        ),
        ("read time", f"{r['seconds']:.1f} s ({r['bytes'] / 1e9 / r['seconds']:.2f} GB/s)"),
        ("RSS after imports", f"{r['rss_before_kib'] / 1024:.0f} MiB"),
        ("peak RSS", f"{r['peak_rss_kib'] / 1024:.0f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
