"""`run_init`: `init_adapter` distributed under torchrun (the split: spectra.distributed.init).

The report and compare jobs own their torchrun splits (spectra.jobs.report, spectra.jobs.compare).
"""

from __future__ import annotations

from typing import Any

from spectra.distributed.runtime import apply_threads, detect_env, distributed_session, rank_device


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
