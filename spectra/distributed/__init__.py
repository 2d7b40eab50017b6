"""spectra.distributed: the torchrun runtime the jobs (spectra.jobs) split their work on.

- runtime.py: the torchrun environment (`detect_env`, `is_distributed`), this rank's device,
  per-process threads, `distributed_session` (process groups).
- partition.py: `shard_items`, `partition`, `CostModel`: cost-balanced, shard-affine shares.
- gather.py: `gather_results`, `all_gather`: per-matrix results in single-process order on rank 0.
- failures.py: `guarded`, `settle`, `DistributedError`: every rank fails loudly with the failing
  rank's matrix and error, never a hang.
- hub.py: `open_checkpoint`: Hub shards downloaded once per node.

See docs/scaling.md.
"""
