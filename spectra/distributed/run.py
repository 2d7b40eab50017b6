"""`run_analyze` / `run_compare` / `run_init`: the library calls the commands make, distributed
under torchrun (init's split: spectra.distributed.init).

Outside torchrun (or with one process) each is exactly `spectra.analyze(...)` /
`spectra.analysis.compare.compare(...)`. Under torchrun with N processes:

1. every rank opens the checkpoint (Hub shards once per node, hub.py) and lists the same
   matrices in the same order (headers only);
2. each rank takes its share (partition.py: contiguous runs of shards, balanced by estimated
   seconds) and computes it with the same per-matrix code a single process runs, on its own
   device, reading and writing the shared spectrum cache;
3. statuses are exchanged (failures.py): if any rank failed, every rank raises one
   `DistributedError` naming the rank, the matrix and the error;
4. rank 0 gathers the per-matrix results, puts them in single-process order, builds the same
   `Analysis` / `Comparison` a single process builds (model summaries are recomputed from the
   full list) and returns it; the other ranks return None and write nothing.

Per-matrix numbers are bit-for-bit those of a single-process run when each process uses the same
thread count (`threads=` or $SPECTRA_NUM_THREADS) and device type; batches of equal shapes are
formed per rank, which does not change per-matrix results on CPU (tested) but may in the last bits
on GPU (see docs/scaling.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from spectra.distributed.failures import Tracker, guarded, settle
from spectra.distributed.gather import gather_results
from spectra.distributed.hub import open_checkpoint
from spectra.distributed.partition import CostModel, matrix_cost, shard_items
from spectra.distributed.runtime import (
    Session,
    apply_threads,
    detect_env,
    distributed_session,
    is_distributed,
    rank_device,
)
from spectra.sources.checkpoint import Checkpoint


class _ShareView(Checkpoint):
    """The same open checkpoint, listing only this rank's matrices (closing is the owner's job)."""

    def __init__(self, base: Checkpoint, keys: Sequence[str]) -> None:  # noqa: D107
        self.__dict__.update(base.__dict__)
        self._share = frozenset(keys)

    def matrices(
        self, include: Sequence[str] = (), exclude: Sequence[str] = (), roles: Sequence[str] = ()
    ) -> list[Any]:
        return [m for m in super().matrices(include, exclude, roles) if m.key in self._share]

    def close(self) -> None:
        return None


def my_share(
    session: Session, matrices: Sequence[Any], model: CostModel | None = None
) -> list[int]:
    """Indices of `matrices` this rank computes (all of them in a world of one)."""
    env = session.env
    return shard_items(matrices, env.rank, env.world_size, cost=lambda r: matrix_cost(r, model))


# --------------------------------------------------------------------------------- analyze


def run_analyze(
    source: Any = None,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    roles: Sequence[str] = (),
    device: str = "auto",
    progress: Callable[..., Any] | None = None,
    threads: int | None = None,
    timeout_s: float | None = None,
    revision: str | None = None,
    local_only: bool | None = None,
    disk_budget: int | None = None,
    **options: Any,
) -> Any:
    """`spectra.analyze(source, ...)` over all torchrun ranks; the Analysis on rank 0, None on
    the others. `options` are analyze()'s other keywords (mp_fit, randomize, outliers, cache,
    seed, max_memory). threads: per-process intra-op threads (reproducibility contract)."""
    from spectra.analysis import analyze

    select = {"include": tuple(include), "exclude": tuple(exclude), "roles": tuple(roles)}
    if not is_distributed():
        apply_threads(threads)
        return analyze(source, device=device, progress=progress, **select, **options)
    with distributed_session(device=device, threads=threads, timeout_s=timeout_s) as s:
        ckpt = open_checkpoint(
            s, source, revision=revision, local_only=local_only, disk_budget=disk_budget
        )
        with ckpt:
            matrices = ckpt.matrices(**select)
            if not matrices:  # analyze() raises its own "no matrices match" error
                return analyze(ckpt, device=str(s.device), **select, **options)
            mine = my_share(s, matrices)

            def work(tracker: Tracker) -> list[tuple[int, Any]]:
                return _analyze_share(ckpt, matrices, mine, s, tracker, progress, select, options)

            status, part = guarded(s, work)
            settle(s, status)
            merged = gather_results(s, part or [], len(matrices))
            if merged is None:
                return None
            return _assemble_analysis(ckpt, merged, device, select, options)


def _analyze_share(
    ckpt: Checkpoint,
    matrices: Sequence[Any],
    mine: Sequence[int],
    session: Session,
    tracker: Tracker,
    progress: Callable[..., Any] | None,
    select: dict[str, tuple[str, ...]],
    options: dict[str, Any],
) -> list[tuple[int, Any]]:
    """This rank's `(index, (LayerMetrics, esd | None, versions))` triples."""
    from spectra.analysis import analyze

    if not mine:
        return []
    keys = [matrices[i].key for i in mine]
    tracker.step(keys[0])

    def tick(done: int, total: int, *rest: Any) -> None:
        if done < len(keys):
            tracker.step(keys[done])
        if progress is not None:
            progress(done, total, *rest)

    an = analyze(
        _ShareView(ckpt, keys), device=str(session.device), progress=tick, **select, **options
    )
    by_key = {lm.key: lm for lm in an.layers}
    return [(i, (by_key[k], an.esds.get(k), an.versions)) for i, k in zip(mine, keys, strict=True)]


def _assemble_analysis(
    ckpt: Checkpoint,
    merged: list[Any],
    device: str,
    select: dict[str, tuple[str, ...]],
    options: dict[str, Any],
) -> Any:
    """The Analysis a single process builds, from per-matrix results in single-process order."""
    from spectra.analysis.analyze import AnalyzeOptions
    from spectra.analysis.results import Analysis
    from spectra.analysis.summary import summarize

    layers = [lm for lm, _, _ in merged]
    esds = {lm.key: esd for lm, esd, _ in merged if esd is not None}
    opts = {k: v for k, v in options.items() if k in AnalyzeOptions.__dataclass_fields__}
    recorded = AnalyzeOptions(device=str(device), **select, **opts).to_dict()
    return Analysis(
        source=str(ckpt.source),
        layers=layers,
        summary=summarize(layers),
        options=recorded,
        esds=esds,
        versions=dict(merged[0][2]),
    )


# --------------------------------------------------------------------------------- compare


def run_compare(
    base: Any,
    finetuned: Any,
    *,
    device: str = "auto",
    progress: Callable[[int, int, str], None] | None = None,
    threads: int | None = None,
    timeout_s: float | None = None,
    **options: Any,
) -> Any:
    """`compare(base, finetuned, ...)` over all torchrun ranks; the Comparison on rank 0, None
    on the others. `options` are compare()'s other keywords (k, epsilons, map, include, exclude,
    roles, allow_missing, unchanged_tol, cache: the base SVDs are cached by the rank that
    computes them)."""
    from spectra.analysis.compare import compare

    if not is_distributed():
        apply_threads(threads)
        return compare(base, finetuned, device=device, progress=progress, **options)
    from spectra.distributed.compare import distributed_compare

    with distributed_session(device=device, threads=threads, timeout_s=timeout_s) as s:
        return distributed_compare(s, base, finetuned, device, progress, options)


# --------------------------------------------------------------------------------- init


def run_init(
    source: Any,
    *,
    device: str = "auto",
    threads: int | None = None,
    timeout_s: float | None = None,
    **options: Any,
) -> Any:
    """`init_adapter(source, ...)` over all torchrun ranks; the InitResult on rank 0, None on the
    others. Outside torchrun (or with one process): `init_adapter(...)`.

    Weight-only methods (pissa, milora, olora, lamda++) are split: rank 0 checks the output
    folder and plans, each rank factorizes a cost-balanced, shard-affine share of the planned
    matrices on its own device, rank 0 gathers the factors and writes everything, identical to
    a single-process run (spectra.distributed.init). Methods that need calibration statistics
    (CorDA, EVA, or any call with ``stats``/``calibration``) run on rank 0 alone, on
    `cuda:LOCAL_RANK` (or the CPU); the other ranks return None at once, without joining a
    process group, so nothing can wait on them. `options` are init_adapter's other keywords.
    """
    from spectra.adapt.init import init_adapter, init_job

    env = detect_env()
    if not env.is_distributed:
        apply_threads(threads)
        return init_adapter(source, device=str(rank_device(env, device)), **options)
    progress = options.pop("progress", None)
    job = init_job(source, device=str(rank_device(env, device)), **options)  # same on all ranks
    if not job.weights_only:
        if not env.is_writer:
            return None
        apply_threads(threads)
        return init_adapter(source, device=str(job.device), progress=progress, **options)
    from spectra.distributed.init import distributed_init

    with distributed_session(device=device, threads=threads, timeout_s=timeout_s) as s:
        return distributed_init(s, job, progress)
