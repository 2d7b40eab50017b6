"""`compare()` split over torchrun ranks: each rank compares its share of the matrix pairs.

Pairing (names and shapes, from headers) is computed identically on every rank and checked with
compare()'s own rules; the pairs are partitioned by estimated cost (two float64 SVDs of the pair's
shape plus the bytes of both sides); each pair is computed by the same pure `compare_pair` a
single process calls; rank 0 rebuilds the `Comparison` (forensics recomputed from all pairs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from spectra.distributed.failures import RERUN, RESUME_FROM_CACHE, Tracker, guarded, settle
from spectra.distributed.gather import gather_results
from spectra.distributed.hub import open_checkpoint
from spectra.distributed.partition import matrix_cost, shard_items
from spectra.distributed.runtime import Session

Progress = Callable[[int, int, str], None]


def distributed_compare(
    session: Session,
    base: Any,
    finetuned: Any,
    device: str,
    progress: Progress | None,
    options: dict[str, Any],
) -> Any:
    """The Comparison on rank 0, None elsewhere (see module docstring)."""
    from spectra.analysis.compare import CompareOptions
    from spectra.analysis.compare_inputs import open_adapter
    from spectra.linalg.cache import resolve_cache

    options = dict(options)
    cache = resolve_cache(options.pop("cache", None))
    opts = CompareOptions(device=str(device), **options)
    job = _Job(session, opts, cache, progress, (base, finetuned))
    adapter = open_adapter(finetuned)
    with open_checkpoint(session, base) as base_ckpt:
        if adapter is not None:
            with adapter:
                return _run(job, base_ckpt, None, adapter)
        with open_checkpoint(session, finetuned) as ft_ckpt:
            return _run(job, base_ckpt, ft_ckpt, None)


@dataclass(frozen=True)
class _Job:
    """What every pair of one distributed comparison shares."""

    session: Session
    opts: Any
    cache: Any
    progress: Progress | None
    names: tuple[Any, Any]


def _plan(base_ckpt: Any, ft_ckpt: Any, adapter: Any, opts: Any) -> tuple[Any, dict[str, Any]]:
    """(Pairing, base refs by key) exactly as compare() forms them (same checks, same errors)."""
    from spectra.analysis.compare import _check_pairing, pair_lora, pair_matrices

    b_refs = _select(base_ckpt, opts)
    if ft_ckpt is not None:
        f_refs = _select(ft_ckpt, opts)
        pairing = pair_matrices(
            {k: m.shape for k, m in b_refs.items()},
            {k: m.shape for k, m in f_refs.items()},
            opts.map,
        )
        _check_pairing(pairing, opts, base_ckpt.source, ft_ckpt.source)
        return pairing, b_refs
    return pair_lora(b_refs, adapter, opts.map, str(base_ckpt.source)), b_refs


def _select(ckpt: Any, opts: Any) -> dict[str, Any]:
    refs = ckpt.matrices(include=opts.include, exclude=opts.exclude, roles=opts.roles)
    return {m.key: m for m in refs}


def _run(job: _Job, base_ckpt: Any, ft_ckpt: Any, adapter: Any) -> Any:
    session, opts = job.session, job.opts
    pairing, b_refs = _plan(base_ckpt, ft_ckpt, adapter, opts)
    refs = [b_refs[b] for b, _ in pairing.pairs]
    env = session.env
    mine = shard_items(refs, env.rank, env.world_size, cost=lambda r: 2 * matrix_cost(r))
    sides = (base_ckpt, ft_ckpt, adapter)

    def work(tracker: Tracker) -> list[tuple[int, Any]]:
        out = []
        for done, i in enumerate(mine):
            b_key, f_key = pairing.pairs[i]
            tracker.step(b_key)
            out.append((i, _pair(job, sides, b_refs[b_key], f_key)))
            if job.progress is not None:
                job.progress(done + 1, len(mine), b_key)
        return out

    status, part = guarded(session, work)
    settle(session, status, RERUN if job.cache is None else RESUME_FROM_CACHE)
    results = gather_results(session, part or [], len(pairing.pairs))
    if results is None:
        return None
    mode = "lora" if adapter is not None else "checkpoint"
    return _assemble(job.names, mode, opts, pairing, results)


def _pair(job: _Job, sides: tuple[Any, Any, Any], ref: Any, f_key: str) -> Any:
    """One PairResult, computed as compare() computes it (base SVD from the cache if any)."""
    from spectra.analysis.compare import PairMeta, base_svd, compare_pair

    base_ckpt, ft_ckpt, adapter = sides
    opts, dev = job.opts, job.session.device
    dtype = torch.float32 if dev.type == "mps" else torch.float64
    w0 = base_ckpt.read(ref, dtype=dtype, device=str(dev))
    if adapter is not None:
        a, b, scale = adapter.read_factors(f_key, dtype=dtype, device=str(dev))
        w1, lora = None, (a, b, float(scale))
    else:
        w1, lora = ft_ckpt.read(f_key, dtype=dtype, device=str(dev)), None
    meta = PairMeta(key=ref.key, ft_key=f_key, role=ref.role, layer=ref.layer)
    return compare_pair(
        w0,
        w1,
        lora=lora,
        meta=meta,
        k=opts.k,
        epsilons=opts.epsilons,
        unchanged_tol=opts.unchanged_tol,
        base_svd=base_svd(base_ckpt, ref, w0, job.cache),
    )


def _assemble(
    names: tuple[Any, Any], mode: str, opts: Any, pairing: Any, results: list[Any]
) -> Any:
    from spectra.analysis.compare import Comparison
    from spectra.analysis.forensics import summarize
    from spectra.analysis.results import runtime_versions

    return Comparison(
        base=str(names[0]),
        finetuned=str(names[1]),
        mode=mode,
        options=opts,
        pairs=tuple(results),
        pairing=pairing,
        forensics=summarize(results, opts.epsilons, unchanged_tol=opts.unchanged_tol),
        versions=runtime_versions(),
    )
