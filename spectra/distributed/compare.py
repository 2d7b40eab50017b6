"""`compare()` split over torchrun ranks: each rank compares its share of the matrix pairs.

Pairing (names and shapes, from headers) is computed on every rank by compare()'s own
`plan_pairs`; the pairs are partitioned by estimated cost (two float64 decompositions of the
pair's shape plus the bytes of both sides); each pair is read and computed by the same
`compare_one` a single process calls; rank 0 rebuilds the `Comparison` (forensics recomputed
from all pairs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


def _run(job: _Job, base_ckpt: Any, ft_ckpt: Any, adapter: Any) -> Any:
    from spectra.analysis.compare import assemble, compare_one, plan_pairs

    session, opts = job.session, job.opts
    finetuned = adapter if adapter is not None else ft_ckpt
    dev = session.device
    pairing, b_refs = plan_pairs(base_ckpt, finetuned, opts)
    refs = [b_refs[b] for b, _ in pairing.pairs]
    env = session.env
    mine = shard_items(refs, env.rank, env.world_size, cost=lambda r: 2 * matrix_cost(r))

    def work(tracker: Tracker) -> list[tuple[int, Any]]:
        out = []
        for done, i in enumerate(mine):
            b_key, f_key = pairing.pairs[i]
            tracker.step(b_key)
            ref = b_refs[b_key]
            out.append((i, compare_one(base_ckpt, ref, finetuned, f_key, opts, dev, job.cache)))
            if job.progress is not None:
                job.progress(done + 1, len(mine), b_key)
        return out

    status, part = guarded(session, work)
    settle(session, status, RERUN if job.cache is None else RESUME_FROM_CACHE)
    results = gather_results(session, part or [], len(pairing.pairs))
    if results is None:
        return None
    mode = "lora" if adapter is not None else "checkpoint"
    return assemble(*job.names, mode, opts, pairing, results)
