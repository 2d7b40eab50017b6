"""spectra.distributed: report, compare (and the spectra they need) under torchrun.

`torchrun --nproc-per-node N -m spectra report SOURCE ...`: each rank computes a cost-balanced
share of the matrices on `cuda:LOCAL_RANK` (or the CPU with gloo), rank 0 gathers the per-matrix
results in single-process order and writes the outputs. Outside torchrun everything here is the
plain single-process call. Commands use:

- `run_analyze(source, ...)` / `run_compare(base, finetuned, ...)` / `run_init(source, ...)`:
  the result on the writer, None on the other ranks (which then write nothing);
- `is_distributed()`, `is_writer()`: where this process stands.

Building blocks for other work: `distributed_session`, `my_share`, `shard_items`, `partition`,
`CostModel`, `gather_results`, `guarded`/`settle` (failure protocol), `open_checkpoint`
(Hub shards once per node). See docs/scaling.md.
"""

from __future__ import annotations

from spectra.distributed.failures import DistributedError, RankStatus, guarded, settle
from spectra.distributed.gather import all_gather, gather_results, merge_indexed
from spectra.distributed.hub import open_checkpoint
from spectra.distributed.partition import CostModel, matrix_cost, partition, shard_items
from spectra.distributed.run import my_share, run_analyze, run_compare, run_init
from spectra.distributed.runtime import (
    DistEnv,
    Session,
    apply_threads,
    detect_env,
    distributed_session,
    is_distributed,
)


def is_writer() -> bool:
    """True on the process that writes outputs (rank 0; always true outside torchrun)."""
    return detect_env().is_writer


__all__ = [
    "CostModel",
    "DistEnv",
    "DistributedError",
    "RankStatus",
    "Session",
    "all_gather",
    "apply_threads",
    "detect_env",
    "distributed_session",
    "gather_results",
    "guarded",
    "is_distributed",
    "is_writer",
    "matrix_cost",
    "merge_indexed",
    "my_share",
    "open_checkpoint",
    "partition",
    "run_analyze",
    "run_compare",
    "run_init",
    "settle",
    "shard_items",
]
