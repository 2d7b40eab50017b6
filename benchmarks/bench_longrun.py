"""Long run: `spectra report` on a synthetic bf16 checkpoint of several GB, peak RSS and its growth.

The checkpoint (written once into `--workdir`, reused when its manifest matches) is Llama-shaped
but narrow: hidden 256, intermediate `--intermediate` (default 65536), so each MLP matrix is
32 MB of bf16 while its float64 Gram matrix stays 256 x 256. Bytes on disk are large, compute per
byte is small: the run measures streaming, not LAPACK. Shards of about 1 GB with an index.

`spectra report` runs as a child process (fresh cache folder, `--quiet`); a thread samples the
child's RSS (psutil) every 0.5 s and counts the spectrum-cache entries written so far, which is
the number of matrices done. Printed: peak RSS (and the kernel's VmHWM), RSS at 10/50/90 % of
the matrices, and the least-squares slope of RSS against matrices done over the middle 80 %:
the RSS growth per matrix, which is ~0 when memory is bounded by the batch, not the model.

    .venv/bin/python benchmarks/bench_longrun.py --size-gb 5 --workdir /tmp/spectra-longrun
    .venv/bin/python benchmarks/bench_longrun.py --size-gb 0.3 --json out.json   # quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from spectra.linalg.cache import CACHE_FORMAT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _source_fixtures import write_safetensors  # noqa: E402

HIDDEN = 256
SHARD_BYTES = 1 << 30


def layer_tensors(i: int, intermediate: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One Llama layer: q/k/v/o (H, H), gate/up (I, H), down (H, I), a norm; bf16 0.02*N(0,1)."""
    p = f"model.layers.{i}."
    shapes = {
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.v_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "mlp.gate_proj.weight": (intermediate, HIDDEN),
        "mlp.up_proj.weight": (intermediate, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, intermediate),
    }
    out = {
        p + name: (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)
        for name, shape in shapes.items()
    }
    out[p + "input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    return out


def build_checkpoint(folder: Path, size_gb: float, intermediate: int) -> dict[str, Any]:
    """Write (or reuse) the sharded checkpoint; returns its manifest."""
    per_layer = 2 * (4 * HIDDEN * HIDDEN + 3 * intermediate * HIDDEN + HIDDEN)
    layers = max(1, math.ceil(size_gb * 1e9 / per_layer))
    want = {"layers": layers, "intermediate": intermediate, "hidden": HIDDEN}
    manifest = folder / "bench-manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("spec") == want:
        return json.loads(manifest.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    per_shard = max(1, SHARD_BYTES // per_layer)
    n_shards = math.ceil(layers / per_shard)
    weight_map: dict[str, str] = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for i in range(s * per_shard, min(layers, (s + 1) * per_shard)):
            tensors.update(layer_tensors(i, intermediate, gen))
        write_safetensors(folder / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN}))
    info = {"spec": want, "bytes": total, "shards": n_shards, "matrices": 7 * layers}
    manifest.write_text(json.dumps(info))
    return info


class Sampler(threading.Thread):
    """Samples (time, rss, matrices done) of a child process every `period` seconds."""

    def __init__(self, pid: int, cache: Path, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.proc, self.cache, self.period = psutil.Process(pid), cache, period
        self.samples: list[tuple[float, int, int]] = []
        self.hwm_kb = 0
        self._halt = threading.Event()

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self._halt.is_set():
            try:
                rss = self.proc.memory_info().rss
                self.hwm_kb = max(self.hwm_kb, _vm_hwm_kb(self.proc.pid))
            except psutil.Error:
                break
            done = sum(1 for _ in self.cache.glob(f"v{CACHE_FORMAT}/entries/*/*.json"))
            self.samples.append((time.perf_counter() - t0, rss, done))
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()


def _vm_hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def growth_per_matrix(samples: list[tuple[float, int, int]], total: int) -> dict[str, float]:
    """RSS at 10/50/90 % of the matrices and the LSQ slope (bytes per matrix) over 10-90 %."""
    mid = [(d, r) for _, r, d in samples if 0.1 * total <= d <= 0.9 * total]
    out: dict[str, float] = {}
    for q in (0.1, 0.5, 0.9):
        at = [r for _, r, d in samples if d >= q * total]
        out[f"rss_mb_at_{int(q * 100)}pct"] = at[0] / 2**20 if at else float("nan")
    if len(mid) >= 3 and len({d for d, _ in mid}) >= 2:
        n = len(mid)
        mx = sum(d for d, _ in mid) / n
        my = sum(r for _, r in mid) / n
        sxx = sum((d - mx) ** 2 for d, _ in mid)
        sxy = sum((d - mx) * (r - my) for d, r in mid)
        out["slope_kb_per_matrix"] = sxy / sxx / 1024
    return out


def peaks_by_decile(samples: list[tuple[float, int, int]], total: int) -> list[float]:
    """Peak RSS (MB) while the matrices done were in each tenth of `total` (NaN: no sample)."""
    peaks = [float("nan")] * 10
    for _, rss, done in samples:
        i = min(9, done * 10 // max(1, total))
        mb = rss / 2**20
        peaks[i] = mb if peaks[i] != peaks[i] else max(peaks[i], mb)
    return peaks


def run_report(ckpt: Path, work: Path, threads: int) -> dict[str, Any]:
    cache, out = work / "cache", work / "report"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "spectra", "report", str(ckpt), "--out", str(out)]
    cmd += ["--cache-dir", str(cache), "--quiet", "--device", "cpu"]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sampler = Sampler(child.pid, cache)
    sampler.start()
    output, _ = child.communicate()
    sampler.stop()
    sampler.join()
    wall = time.perf_counter() - t0
    if child.returncode != 0:
        raise SystemExit(f"spectra report failed ({child.returncode}):\n{output.decode()[-3000:]}")
    rss = [r for _, r, _ in sampler.samples]
    return {
        "wall_s": wall,
        "samples": len(rss),
        "peak_rss_mb": max(rss) / 2**20,
        "vm_hwm_mb": sampler.hwm_kb / 1024,
        "matrices_done": sampler.samples[-1][2] if sampler.samples else 0,
        "report_files": sorted(p.name for p in out.iterdir()),
        "timeline": [(round(t, 1), round(r / 2**20, 1), d) for t, r, d in sampler.samples],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=5.0)
    ap.add_argument("--intermediate", type=int, default=65536)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="spectra-longrun-"))
    ckpt = work / "ckpt"
    t0 = time.perf_counter()
    info = build_checkpoint(ckpt, args.size_gb, args.intermediate)
    print(
        f"checkpoint: {info['bytes'] / 1e9:.2f} GB, {info['shards']} shards, "
        f"{info['matrices']} matrices ({time.perf_counter() - t0:.0f} s to build or reuse)"
    )
    res = run_report(ckpt, work, args.threads)
    raw = [(t, int(r * 2**20), d) for t, r, d in res["timeline"]]
    res.update(growth_per_matrix(raw, info["matrices"]))
    res["peak_mb_by_decile"] = peaks_by_decile(raw, info["matrices"])
    res["checkpoint"] = info
    print(
        f"spectra report: {res['wall_s']:.0f} s wall, peak RSS {res['peak_rss_mb']:.0f} MB "
        f"(VmHWM {res['vm_hwm_mb']:.0f} MB), {res['matrices_done']}/{info['matrices']} matrices"
    )
    print(
        "RSS at 10/50/90 % of matrices: "
        f"{res['rss_mb_at_10pct']:.0f} / {res['rss_mb_at_50pct']:.0f} / "
        f"{res['rss_mb_at_90pct']:.0f} MB; growth "
        f"{res.get('slope_kb_per_matrix', float('nan')):+.1f} KB per matrix (LSQ, 10-90 %)"
    )
    print(
        "peak RSS by tenth of matrices done (MB): "
        + " ".join(f"{p:.0f}" for p in res["peak_mb_by_decile"])
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
