"""The spectral engine: stream matrices from a checkpoint, batch equal shapes, decompose, cache.

`compute_spectra(ckpt, matrices, mode=...)` yields one `Spectrum` per matrix, in the order of
`matrices`, with key/role/layer filled. Pipeline:

1. With a cache: each matrix's entry key is `sha256(content key, parameters)`; entries present
   on disk are not read from the checkpoint at all. Content keys use the shard digest memo of the
   cache (keyed by realpath, size, mtime), so a second run does not rehash multi-GB shards; the
   key string has the same form as `Checkpoint.content_key`.
2. The rest is grouped by shape and cut into batches under a memory budget (`max_memory`
   bytes, default half the free GPU memory, or 1 GiB on CPU; halved again when prefetching,
   since two batches are alive then).
3. A background thread reads the next batch (one-deep queue) while the current one computes;
   a reading error is re-raised in the caller.
4. A matrix with NaN/Inf entries yields a failed Spectrum (`status="failed"`, message with
   the NaN and Inf counts), and the run continues. Results are buffered only until every
   earlier matrix has been yielded.
5. A matrix whose working-memory estimate exceeds the budget on its own is computed alone,
   never refused (`decompose.oversize_plan`): for singular values (gram64 route) the float64
   Gram matrix is accumulated over slices of the long side, so only the Gram matrix and one
   slice live on the compute device; other modes, or a device that cannot hold even the Gram
   matrix, compute it on the CPU. One `MemoryBudgetWarning` per run says how many matrices
   this concerned, the largest, and how they were computed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

from spectra.device import resolve_device
from spectra.linalg.batching import Batch, memory_budget, plan_batches, prefetch
from spectra.linalg.cache import SpectrumCache
from spectra.linalg.decompose import Oversize, SpectrumOptions, decompose_batch, oversize_plan
from spectra.linalg.rsvd import DEFAULT_TOL
from spectra.linalg.spectrum import Spectrum
from spectra.sources import shard_digest

ProgressFn = Callable[[int, int, int], None]
"""progress(done_matrices, total_matrices, bytes_read_from_checkpoint)"""


class MemoryBudgetWarning(UserWarning):
    """Some matrices need more working memory than the engine's budget; they were computed
    alone, chunked or on the CPU (the message says which)."""


class CheckpointLike(Protocol):
    """What the engine needs from `spectra.sources.Checkpoint`."""

    def matrices(self) -> list[Any]: ...

    def read_many(
        self, refs: Sequence[Any], *, dtype: torch.dtype, device: str
    ) -> Iterator[tuple[Any, torch.Tensor]]: ...

    def content_key(self, ref: Any) -> str: ...


def compute_spectra(
    ckpt: CheckpointLike,
    matrices: Sequence[Any] | None = None,
    *,
    mode: str = "values",
    k: int | None = None,
    device: str | torch.device = "auto",
    max_memory: int | float | None = None,
    dtype: torch.dtype | None = None,
    cache: SpectrumCache | None = None,
    progress: ProgressFn | None = None,
    prefetch: bool = True,
    seed: int = 0,
    route: str = "auto",
    method: str = "auto",
    oversample: int = 10,
    power_iters: int | None = None,
    tol: float = DEFAULT_TOL,
    max_iters: int | None = None,
) -> Iterator[Spectrum]:
    """Spectra of `matrices` (MatrixRefs of `ckpt`; default all of `ckpt.matrices()`).

    mode: "values" (all singular values; `route` "auto" = float64 Gram eigenvalues),
        "topk" (top-`k` values + vectors; `method` "auto" = block Krylov, or an exact SVD when
        the sketch would be a large share of the matrix), "full" (full SVD, float64 default).
    device: "auto" (cuda, then mps, then cpu), "cpu", "cuda[:N]", "mps".
    max_memory: working-memory budget in bytes for one batch.
    dtype: working precision (float32/float64); see SpectrumOptions.
    cache: a SpectrumCache to reuse and store results (None: no cache).
    progress: called as progress(done, total, bytes_read) after each yielded Spectrum.
    prefetch: read the next batch on a background thread.
    seed, oversample, power_iters, tol, max_iters: randomized SVD knobs (rsvd.py).

    Arguments are validated when called; the work happens as the iterator is consumed.

    >>> from spectra.sources import Checkpoint, bundled_model_path  # doctest: +SKIP
    >>> with Checkpoint.open(bundled_model_path()) as ck:  # doctest: +SKIP
    ...     spectra = list(compute_spectra(ck, mode="values"))
    """
    opts = SpectrumOptions(
        mode=mode,
        k=k,
        route=route,
        method=method,
        oversample=oversample,
        power_iters=power_iters,
        tol=tol,
        max_iters=max_iters,
        seed=seed,
        dtype=dtype,
    )
    refs = list(ckpt.matrices() if matrices is None else matrices)
    dev = resolve_device(device)
    budget = memory_budget(dev, max_memory)
    run = _Run(ckpt, refs, opts, dev, budget // 2 if prefetch else budget, cache, progress)
    return run.stream(prefetch)


def matrix_content_key(ckpt: CheckpointLike, ref: Any, cache: SpectrumCache | None) -> str:
    """Content key of `ref`'s bytes: `sha256(shard):offset:nbytes:dtype:MxN[:T]`, with the
    shard digest taken from the cache's persistent memo when the shard is a local file;
    otherwise `ckpt.content_key(ref)`."""
    tensor = getattr(ref, "tensor", None)
    shard = getattr(tensor, "shard", None)
    if cache is None or shard is None or not os.path.isfile(shard):
        return ckpt.content_key(ref)
    digest = cache.shard_digest(shard, shard_digest)
    m, n = ref.shape
    tail = ":T" if getattr(ref, "transpose", False) else ""
    return f"{digest}:{ref.offset}:{ref.nbytes}:{tensor.dtype}:{m}x{n}{tail}"


class _Run:
    """State of one compute_spectra call: plan, reorder buffer, progress counters."""

    def __init__(
        self,
        ckpt: CheckpointLike,
        refs: list[Any],
        opts: SpectrumOptions,
        device: torch.device,
        budget: int,
        cache: SpectrumCache | None,
        progress: ProgressFn | None,
    ) -> None:
        self.ckpt, self.refs, self.opts, self.device = ckpt, refs, opts, device
        self.cache, self.progress = cache, progress
        self.read_dtype = opts.work_dtype()
        self.keys: list[str | None] = [None] * len(refs)
        self.cached: set[int] = set()
        self.budget = budget
        self.ready: dict[int, Spectrum] = {}
        self.next = 0
        self.bytes_read = 0
        self.oversize: dict[tuple[int, int], Oversize | None] = {}

    def stream(self, background: bool) -> Iterator[Spectrum]:
        self._lookup_cache()
        shapes = [tuple(r.shape) for r in self.refs]
        batches = plan_batches(shapes, self.opts.bytes_per_matrix, self.budget, skip=self.cached)
        self._warn_oversize([i for b in batches for i in b.indices])
        loaded = prefetch((self._read(b) for b in batches), enabled=background)
        yield from self._drain()
        for batch, W in loaded:
            self._compute(batch, W)
            del W
            yield from self._drain()
        yield from self._drain()

    def _lookup_cache(self) -> None:
        if self.cache is None:
            return
        for i, ref in enumerate(self.refs):
            content = matrix_content_key(self.ckpt, ref, self.cache)
            key = self.cache.entry_key(content, self.opts.params(tuple(ref.shape), self.device))
            self.keys[i] = key
            if self.cache.contains(key):
                self.cached.add(i)

    def _read(self, batch: Batch) -> tuple[Batch, torch.Tensor]:
        """Read `batch` into one `(b, m, n)` CPU tensor (pinned when computing on CUDA)."""
        m, n = batch.shape
        pin = self.device.type == "cuda"
        W = torch.empty((len(batch.indices), m, n), dtype=self.read_dtype, pin_memory=pin)
        slots: dict[str, list[int]] = {}
        for j, i in enumerate(batch.indices):
            slots.setdefault(self.refs[i].key, []).append(j)
        wanted = [self.refs[i] for i in batch.indices]
        for ref, t in self.ckpt.read_many(wanted, dtype=self.read_dtype, device="cpu"):
            W[slots[ref.key].pop(0)].copy_(t)
        return batch, W

    def _plan(self, shape: tuple[int, int]) -> Oversize | None:
        if shape not in self.oversize:
            self.oversize[shape] = oversize_plan(self.opts, shape, self.budget, self.device)
        return self.oversize[shape]

    def _warn_oversize(self, planned: list[int]) -> None:
        """One MemoryBudgetWarning for the planned matrices that exceed the budget alone."""
        plans = {i: p for i in planned if (p := self._plan(tuple(self.refs[i].shape)))}
        if not plans:
            return
        worst = max(plans, key=lambda i: plans[i].need)
        plan = plans[worst]
        m, n = self.refs[worst].shape
        warnings.warn(
            f"{len(plans)} of {len(self.refs)} matrices need more working memory than the budget "
            f"of {_mib(self.budget)} on {self.device} (largest: {self.refs[worst].key!r}, "
            f"{m} x {n}, about {_mib(plan.need)}); they are computed one at a time, the largest "
            f"{plan.describe()}. "
            "Pass a larger max_memory if the device has room.",
            MemoryBudgetWarning,
            stacklevel=4,
        )

    def _compute(self, batch: Batch, W: torch.Tensor) -> None:
        names = [self.refs[i].key for i in batch.indices]
        self.bytes_read += sum(int(self.refs[i].nbytes) for i in batch.indices)
        plan = self._plan(batch.shape) if len(batch.indices) == 1 else None
        if plan is not None and plan.gram_block is not None:
            # W stays on the CPU; slices go to plan.device one at a time
            specs = decompose_batch(
                W, self.opts, names=names, gram_block=plan.gram_block, device=plan.device
            )
        else:
            Wd = W.to(self.device if plan is None else plan.device, non_blocking=True)
            specs = decompose_batch(Wd, self.opts, names=names)
        for i, spec in zip(batch.indices, specs, strict=True):
            if self.cache is not None and self.keys[i] is not None:
                self.cache.put(self.keys[i], spec)
            self.ready[i] = spec

    def _recompute(self, i: int) -> Spectrum:
        """One matrix, synchronously (its cache entry turned out corrupted)."""
        batch = Batch((i,), tuple(self.refs[i].shape))
        self._compute(*self._read(batch))
        return self.ready.pop(i)

    def _drain(self) -> Iterator[Spectrum]:
        """Yield every result that is next in input order."""
        while self.next < len(self.refs):
            i = self.next
            if i in self.ready:
                spec = self.ready.pop(i)
            elif i in self.cached:
                spec = self.cache.get(self.keys[i]) if self.cache else None
                if spec is None:
                    spec = self._recompute(i)
            else:
                return
            ref = self.refs[i]
            yield spec.with_meta(key=ref.key, role=ref.role, layer=ref.layer)
            self.next += 1
            if self.progress is not None:
                self.progress(self.next, len(self.refs), self.bytes_read)


def _mib(nbytes: int) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (KiB at least)."""
    for unit, shift in (("GiB", 30), ("MiB", 20)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):,.1f} {unit}"
    return f"{nbytes / 1024:,.1f} KiB"
