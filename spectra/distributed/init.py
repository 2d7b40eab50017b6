"""`init_adapter` split over torchrun ranks: each rank factorizes its share of the planned matrices.

Phases (every one ends in `settle`, so a failure on any rank stops every rank with one
`DistributedError` naming the rank, the matrix and the error, instead of a hang):

1. refuse: rank 0 checks the output folder (`check_output_dir`) before anything is read, so a
   refusal reaches the other ranks before they compute in vain;
2. plan: every rank opens the checkpoint (Hub shards once per node); rank 0 resolves targets and
   ranks (`plan_init`: an allocator's spectra are computed once, on rank 0) and sends the planned
   modules to every rank;
3. factorize: each rank computes the method's factors (`factor_matrix`, the same call a single
   process makes) for its share of the modules (`init_share`: contiguous runs of shards,
   balanced by `matrix_cost`) on its own device; the factors (small: ``r (m + n)`` numbers per
   matrix) travel to rank 0 as CPU tensors;
4. write: rank 0 runs `write_init` with the gathered factors: it reads every target once more
   for the residual base and the reconstruction errors, exactly as a single process does, so the
   outputs are the single-process outputs bit for bit (same seed, thread count and device type;
   docs/scaling.md). The other ranks return None and write nothing.

Only weight-only methods are split (`InitJob.weights_only`): methods that need calibration
statistics (CorDA, EVA) run on rank 0 alone (spectra.distributed.run.run_init).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from spectra.distributed.failures import RERUN, Tracker, guarded, settle
from spectra.distributed.gather import all_gather, gather_results
from spectra.distributed.hub import open_checkpoint
from spectra.distributed.partition import matrix_cost, matrix_shard, shard_items
from spectra.distributed.runtime import Session

Progress = Callable[[int, int, str], None]


def init_share(
    modules: Sequence[Any], refs: dict[str, Any], rank: int, world_size: int
) -> list[int]:
    """Indices of the planned `modules` (ModulePlan-like: ``.key``) that `rank` factorizes.

    refs: the checkpoint's MatrixRefs by key (shape, bytes, shard). Shard-affine and balanced by
    `matrix_cost` (the full-spectrum estimate: an upper bound for top-r methods whose ratio
    between matrices of one model is close to the true one).
    """
    items = [refs[mp.key] for mp in modules]
    return shard_items(items, rank, world_size, cost=matrix_cost, group=matrix_shard)


def distributed_init(session: Session, job: Any, progress: Progress | None = None) -> Any:
    """The InitResult on rank 0, None on the others (see the module docstring).

    job: this rank's `spectra.adapt.init.InitJob` (same arguments on every rank, this rank's
    device) with ``job.weights_only``.
    """
    from spectra.outdir import check_output_dir

    started = time.perf_counter()

    def refuse(tracker: Tracker) -> None:
        if session.is_writer:
            check_output_dir(job.out, force=job.force)

    status, _ = guarded(session, refuse)
    settle(session, status, RERUN)
    with open_checkpoint(session, job.source) as ckpt:
        planned = _plan_on_writer(session, ckpt, job)
        modules = all_gather(session, None if planned is None else planned.plan.modules)[0]
        refs = {m.key: m for m in ckpt.matrices()}
        env = session.env
        mine = init_share(modules, refs, env.rank, env.world_size)

        def work(tracker: Tracker) -> list[tuple[int, Any]]:
            return _factor_share(
                tracker, ckpt, job, [(i, modules[i]) for i in mine], refs, progress
            )

        status, part = guarded(session, work)
        settle(session, status, RERUN)
        gathered = gather_results(session, part or [], len(modules))
        if gathered is None or planned is None:
            return None
        from spectra.adapt.init import write_init

        factors = {mp.key: f for mp, f in zip(modules, gathered, strict=True)}
        return write_init(ckpt, job, planned, factors=factors, progress=progress, started=started)


def _plan_on_writer(session: Session, ckpt: Any, job: Any) -> Any:
    """Rank 0's PlannedInit (None on the other ranks), with planning errors settled."""
    from spectra.adapt.init import plan_init

    def plan(tracker: Tracker) -> Any:
        return plan_init(ckpt, job) if session.is_writer else None

    status, planned = guarded(session, plan)
    settle(session, status, RERUN)
    return planned


def _factor_share(
    tracker: Tracker,
    ckpt: Any,
    job: Any,
    share: Sequence[tuple[int, Any]],
    refs: dict[str, Any],
    progress: Progress | None,
) -> list[tuple[int, Any]]:
    """``(index, Factors)`` for this rank's planned modules, factors moved to the CPU."""
    from spectra.adapt.init_write import factor_matrix
    from spectra.adapt.registry import Factors

    out = []
    for done, (i, mp) in enumerate(share):
        tracker.step(mp.key)
        W = ckpt.read(refs[mp.key], dtype=torch.float32, device=str(job.device))
        f = factor_matrix(job.init, W, mp, svd=job.svd, seed=job.seed)
        out.append((i, Factors(f.A.cpu(), f.B.cpu(), dict(f.info))))
        if progress is not None:
            progress(done + 1, len(share), mp.key)
    return out
