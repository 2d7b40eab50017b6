"""End-to-end engine benchmark: full-spectrum and top-64 passes over real and synthetic checkpoints.

For each checkpoint: `compute_spectra` in mode "values" (all singular values) and "topk" (k=64),
timed against bare loops over the same matrices in the same run (read + `torch.linalg.svdvals`,
read + float64 Gram `eigvalsh`, read + `torch.svd_lowrank(q=64, niter=4)`), then a cached pair
of runs (the first fills a fresh cache, the second reads it). Matrices/s and GB/s count the bytes
of the matrices as stored on disk.

Checkpoints: the bundled all-MiniLM-L6-v2, and a synthetic Llama-shaped bf16 checkpoint in two
shards with an index, generated in a temporary folder (TinyLlama-1.1B widths: hidden 2048,
intermediate 5632, 4 KV heads of 64). Its entries have a decaying column scaling, so spectra decay
as trained weights do (pure Gaussian matrices would have flat Marchenko-Pastur spectra).

    python benchmarks/bench_engine.py                     # MiniLM + 4 Llama layers (28 matrices)
    python benchmarks/bench_engine.py --layers 22 --vocab 32000   # the full 1.1B-parameter model
    python benchmarks/bench_engine.py --device cuda --threads 0 --layers 22 --vocab 32000
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from spectra.linalg.cache import SpectrumCache
from spectra.linalg.decompose import SpectrumOptions
from spectra.linalg.engine import EngineOptions, compute_spectra
from spectra.sources.bundled import bundled_model_path
from spectra.sources.checkpoint import Checkpoint

HIDDEN, INTER, KV = 2048, 5632, 256


def llama_shapes(layers: int, vocab: int) -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    if vocab:
        shapes["model.embed_tokens.weight"] = (vocab, HIDDEN)
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.self_attn.q_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}.self_attn.k_proj.weight"] = (KV, HIDDEN)
        shapes[f"{p}.self_attn.v_proj.weight"] = (KV, HIDDEN)
        shapes[f"{p}.self_attn.o_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}.mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[f"{p}.mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[f"{p}.mlp.down_proj.weight"] = (HIDDEN, INTER)
    if vocab:
        shapes["lm_head.weight"] = (vocab, HIDDEN)
    return shapes


def write_llama(folder: Path, layers: int, vocab: int, shards: int = 2) -> int:
    """Write a bf16 Llama-shaped checkpoint (`shards` files + index); return its parameter count."""
    shapes = llama_shapes(layers, vocab)
    names = list(shapes)
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    gen = torch.Generator().manual_seed(0)
    total = 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {}
        for name in names[s * per : (s + 1) * per]:
            m, n = shapes[name]
            scale = torch.arange(1, n + 1, dtype=torch.float32).pow(-0.5)[
                torch.randperm(n, generator=gen)
            ]
            part[name] = (torch.randn(m, n, generator=gen) * scale * 0.05).bfloat16()
            weight_map[name] = fname
            total += m * n
        save_file(part, str(folder / fname), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "hidden_size": HIDDEN, "num_hidden_layers": layers})
    )
    return total


def bare_loop(ck: Checkpoint, refs: list, fn: Callable[[torch.Tensor], object]) -> float:
    t0 = time.perf_counter()
    for _ref, W in ck.read_many(refs, dtype=torch.float32):
        fn(W)
    return time.perf_counter() - t0


def gram64(W: torch.Tensor) -> torch.Tensor:
    W64 = W.double()
    G = W64.T @ W64 if W64.shape[0] >= W64.shape[1] else W64 @ W64.T
    return torch.linalg.eigvalsh(G)


def timed_engine(
    ck: Checkpoint,
    refs: list,
    options: SpectrumOptions,
    device: str,
    cache: SpectrumCache | None = None,
) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = list(compute_spectra(ck, refs, options, engine=EngineOptions(device=device), cache=cache))
    return time.perf_counter() - t0, out


def bench_checkpoint(label: str, path: Path, device: str, rows: list[str]) -> None:
    with Checkpoint.open(path) as ck:
        refs = ck.matrices()
        nbytes = sum(r.nbytes for r in refs)
        gb = nbytes / 1e9
        params = sum(r.numel for r in refs)

        def row(what: str, t: float, base: float | None, note: str = "") -> None:
            ratio = f"{t / base:.2f}" if base else "-"
            line = (
                f"| {label} | {what} | {t:.2f} | {len(refs) / t:.2f} | {gb / t:.3f} | {ratio} |"
                f" {note} |"
            )
            print(line, flush=True)
            rows.append(line)

        print(f"{label}: {len(refs)} matrices, {params / 1e6:.1f}M params, {gb:.3f} GB", flush=True)
        t_svdvals = bare_loop(ck, refs, torch.linalg.svdvals)
        t_gram = bare_loop(ck, refs, gram64)
        fastest = min(t_svdvals, t_gram)
        row("bare loop: read + svdvals f32", t_svdvals, fastest)
        row("bare loop: read + gram64 eigvalsh", t_gram, fastest)
        t_vals, out = timed_engine(ck, refs, SpectrumOptions(mode="values"), device)
        row("compute_spectra values (gram64)", t_vals, fastest, "ratio to fastest bare loop")
        t_low = bare_loop(ck, refs, lambda W: torch.svd_lowrank(W, q=min(64, *W.shape), niter=4))
        row("bare loop: read + svd_lowrank q=64 niter=4", t_low, t_low)
        t_top, top = timed_engine(ck, refs, SpectrumOptions(mode="topk", k=64), device)
        methods = sorted({s.method for s in top})
        its = [s.iterations for s in top if s.iterations is not None]
        note = f"ratio to svd_lowrank loop; methods {methods}"
        if its:
            note += f", iterations {min(its)}-{max(its)}"
        row("compute_spectra topk k=64 (auto)", t_top, t_low, note)
        with tempfile.TemporaryDirectory() as tmp:
            cache = SpectrumCache(tmp)
            t_fill, _ = timed_engine(ck, refs, SpectrumOptions(mode="values"), device, cache)
            t_hit, hit = timed_engine(
                ck, refs, mode="values", device=device, cache=SpectrumCache(tmp)
            )
            assert all(s.from_cache for s in hit)
            row("values, 1st run filling a fresh cache", t_fill, t_vals, "ratio to uncached run")
            row("values, 2nd run from cache", t_hit, t_fill, f"speedup {t_fill / t_hit:.0f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps | auto")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = leave default)")
    ap.add_argument("--layers", type=int, default=4, help="Llama layers (22 = TinyLlama-1.1B)")
    ap.add_argument("--vocab", type=int, default=0, help="embedding/lm_head rows (0 = none)")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    header = [
        f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"machine={platform.machine()}",
        "",
        "| checkpoint | pass | time s | matrices/s | GB/s | ratio | note |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    rows: list[str] = []
    if not args.skip_minilm:
        bench_checkpoint("MiniLM-L6 (f32)", bundled_model_path(), args.device, rows)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        n = write_llama(Path(tmp), args.layers, args.vocab)
        print(f"wrote synthetic Llama ({n / 1e6:.0f}M params) in {time.perf_counter() - t0:.1f}s")
        label = f"Llama-shaped bf16, {args.layers} layers, {n / 1e6:.0f}M params"
        bench_checkpoint(label, Path(tmp), args.device, rows)
    if args.out:
        args.out.write_text("\n".join(header + rows) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
