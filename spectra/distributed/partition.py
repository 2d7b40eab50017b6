"""Split a list of matrices over ranks: balanced by estimated seconds, each rank on its own files.

Pure functions; no torch.distributed here.

Cost model (seconds, estimated): `flops / flops_per_s + bytes / bytes_per_s`, with
- full spectrum (values or full SVD) of an m x n matrix, M = min(m, n): `m * n * M` flops
  (the Gram product is 2 m n M, its eigen/SVD solve O(M^3); one number tracks both);
- top-k randomized SVD: `2 * m * n * (k + p) * (2 q + 2)` flops (a sketch, q power iterations
  of W and W^T products, the projection), p = oversampling;
- bytes: the bytes stored in the checkpoint (read once).
The defaults of `CostModel` are this project's CPU measurements (benchmarks/bench_scaling.py,
docs/scaling.md); only the ratio of the two rates matters for the split.

Split: items keep their order (the checkpoint's shard order), and the list is cut into
`world_size` contiguous runs of near-equal cost (each item goes to the rank whose cost interval
holds its midpoint). So each rank reads a contiguous range of shards and shares at most the shard
at each of its two ends with a neighbour; the heaviest rank exceeds the mean by less than the
most expensive single item.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from spectra.errors import ValidationError

T = TypeVar("T")


@dataclass(frozen=True)
class CostModel:
    """Throughputs that turn a matrix into estimated seconds.

    flops_per_s: sustained decomposition rate; bytes_per_s: checkpoint read rate.
    mode: "values" | "full" (full spectrum) or "topk" (randomized, `k`, `oversample`,
    `power_iters`).
    """

    flops_per_s: float = 2.0e10
    bytes_per_s: float = 1.0e9
    mode: str = "values"
    k: int = 64
    oversample: int = 10
    power_iters: int = 4

    def __post_init__(self) -> None:
        if not (self.flops_per_s > 0 and self.bytes_per_s > 0):
            raise ValidationError(
                f"CostModel rates must be > 0, got flops_per_s={self.flops_per_s!r}, "
                f"bytes_per_s={self.bytes_per_s!r}"
            )
        if self.mode not in ("values", "full", "topk"):
            raise ValidationError(f"CostModel mode must be values, full or topk, got {self.mode!r}")

    def flops(self, shape: tuple[int, int]) -> float:
        """Estimated floating-point operations for one matrix of `shape` (m, n)."""
        m, n = (int(d) for d in shape)
        if self.mode == "topk":
            width = min(self.k + self.oversample, m, n)
            return 2.0 * m * n * width * (2 * self.power_iters + 2)
        return float(m) * n * min(m, n)

    def seconds(self, shape: tuple[int, int], nbytes: int) -> float:
        """Estimated wall time of one matrix: compute plus reading its bytes."""
        return self.flops(shape) / self.flops_per_s + nbytes / self.bytes_per_s


def matrix_cost(ref: Any, model: CostModel | None = None) -> float:
    """Estimated seconds for a `MatrixRef`-like object (`.shape`, `.nbytes`)."""
    return (model or CostModel()).seconds(tuple(ref.shape), int(ref.nbytes))


def matrix_shard(ref: Any) -> str:
    """The shard file a `MatrixRef`-like object lives in ('' when unknown)."""
    tensor = getattr(ref, "tensor", None)
    return str(getattr(tensor, "shard", ""))


def partition(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """Indices of `costs` per rank: contiguous runs of near-equal total cost (deterministic).

    Every index appears exactly once, in increasing order within its rank; ranks may be empty
    when there are fewer items than ranks. Zero-cost lists are split by count.

    >>> partition([1, 1, 1, 1], 2)
    [[0, 1], [2, 3]]
    >>> partition([3, 1, 1, 1], 2)
    [[0], [1, 2, 3]]
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValidationError(f"world_size must be a positive integer, got {world_size!r}")
    weights = [float(c) for c in costs]
    if any(not (w >= 0) or w == float("inf") for w in weights):
        bad = next(w for w in weights if not (w >= 0) or w == float("inf"))
        raise ValidationError(f"costs must be finite and >= 0, got {bad!r}")
    peak = max(weights, default=0.0)
    if peak > 0:
        # Relative costs: dividing by the largest keeps subnormal or huge costs from
        # underflowing the per-rank share to zero or overflowing the total to inf.
        weights = [w / peak for w in weights]
    else:
        weights = [1.0] * len(weights)
    total = sum(weights)
    share = total / world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    before = 0.0
    for i, w in enumerate(weights):
        rank = min(world_size - 1, int((before + w / 2) / share))
        out[rank].append(i)
        before += w
    return out


def shard_items(
    items: Sequence[T],
    rank: int,
    world_size: int,
    *,
    cost: Callable[[T], float] = matrix_cost,
    group: Callable[[T], str] = matrix_shard,
) -> list[int]:
    """Indices (into `items`) that `rank` computes.

    Items are ordered by the first appearance of their `group` (shard), then by position, so
    interleaved listings still give each rank whole runs of one file; the cut is `partition`.
    """
    if not 0 <= rank < world_size:
        raise ValidationError(f"rank must be in [0, {world_size}), got {rank!r}")
    order = _grouped_order([group(x) for x in items])
    parts = partition([cost(items[i]) for i in order], world_size)
    return sorted(order[j] for j in parts[rank])


def _grouped_order(groups: Sequence[str]) -> list[int]:
    first: dict[str, int] = {}
    for i, g in enumerate(groups):
        first.setdefault(g, i)
    return sorted(range(len(groups)), key=lambda i: (first[groups[i]], i))


def loads(costs: Sequence[float], parts: Sequence[Sequence[int]]) -> list[float]:
    """Total cost per rank of a partition (for balance checks and logs)."""
    return [sum(float(costs[i]) for i in part) for part in parts]
