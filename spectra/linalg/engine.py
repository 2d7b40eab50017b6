"""The spectral engine: stream matrices from a checkpoint, batch equal shapes, decompose, cache.

`compute_spectra(ckpt, matrices, SpectrumOptions(...))` yields one `Spectrum` per matrix, in the
order of `matrices`, with key/role/layer filled. Pipeline:

1. With a cache: each matrix's entry key is `sha256(content key, parameters)`; entries present
   on disk are not read from the checkpoint at all. Content keys use the shard digest memo of the
   cache (keyed by realpath and file identity: device, inode, size, mtime, ctime), so a second
   run does not rehash multi-GB shards; the key string has the same form as
   `Checkpoint.content_key`. Shards not in the memo (a first run, a changed file) are hashed
   on a worker thread, one after another in order of first use, while the first batches
   compute, instead of all up front: their matrices are planned as not cached, and get their
   keys when their batch is read (a matrix then found in the cache leaves the batch unread).
   Before a computed spectrum is stored, its shard is confirmed to be
   the file the key was made of (`confirm_unchanged`): a file rewritten during the run ends in a
   SourceError instead of spectra of new bytes under the old digest.
2. The rest is grouped by shape and cut into batches under a memory budget (`max_memory`
   bytes, default half the free GPU memory, or 1 GiB on CPU; halved again when prefetching,
   since two batches are alive then). On the gram64 route bf16/fp16 matrices are read as
   stored (half a float32 copy) and a batch of one matrix is not copied again.
3. A background thread reads the next batch (one-deep queue) while the current one computes;
   a reading error is re-raised in the caller. A `MemoryGate` holds the read back while the
   batch in flight and the next one together exceed the whole budget (only possible with a
   matrix over the halved budget), so the prefetch never doubles an oversize matrix's memory.
   With `extras`, `extras.compute(ref, W)` runs on each matrix read (no second read).
4. A matrix with NaN/Inf entries yields a failed Spectrum (`status="failed"`, message with
   the NaN and Inf counts), and the run continues. Results are buffered only until every
   earlier matrix has been yielded.
5. A matrix whose working-memory estimate exceeds the budget on its own is computed alone,
   never refused (`decompose.oversize_plan`): for singular values (gram64 route) the float64
   Gram matrix is accumulated over slices of the long side, so only the Gram matrix and one
   slice live on the compute device; other modes, or a device that cannot hold even the Gram
   matrix, compute it on the CPU. One `MemoryBudgetWarning` per run says how many matrices
   this concerned, the largest, and how they were computed.
6. With `then` (the report's fits), each Spectrum is handed to `then` on a worker thread
   (spectra.overlap.Lagged) as it is drained, and the engine yields `then`'s results instead:
   those of one drain are taken (waited for) only before the batch after the next one is
   computed, so the fits of batch i run while batch i+1 is decomposed and batch i+2 is read,
   and the engine is never more than one batch ahead of its caller. Each progress call comes
   after its result is yielded, and an error of `then` is raised at its matrix, as a caller
   fitting each Spectrum in its loop would see them; a read or compute error comes after the
   results of every matrix before it.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar, overload

import torch

from spectra.device import require_host_memory, resolve_device
from spectra.errors import SourceError
from spectra.linalg.batching import (
    Batch,
    MemoryGate,
    check_max_memory,
    memory_budget,
    plan_batches,
    prefetch,
)
from spectra.linalg.cache import SpectrumCache
from spectra.linalg.decompose import Oversize, SpectrumOptions, decompose_batch, oversize_plan
from spectra.linalg.exact import resolve_route
from spectra.linalg.spectrum import Spectrum
from spectra.overlap import Lagged
from spectra.sources.checkpoint import Checkpoint
from spectra.sources.reader import ShardDigest, confirm_unchanged, shard_record
from spectra.sources.roles import MatrixRef

R = TypeVar("R")
ProgressFn = Callable[[int, int, int], None]
"""progress(done_matrices, total_matrices, bytes_read_from_checkpoint)"""

# Stored dtypes the gram64 route reads as they are (upcast to float64 slice by slice, exactly):
# half the input memory of a float32 copy, and bit-identical results.
_NARROW_READS = {"BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class MatrixExtras:
    """Per-matrix values computed from `W` while the engine holds it, so a metric that needs
    the weights (e.g. the outlier ratio) costs no second read of the checkpoint.

    names: the keys `compute` returns; a cached spectrum whose entry lacks one of them gets its
        matrix read (alone, no decomposition) and the entry updated.
    compute: `compute(ref, W) -> {name: JSON-safe value}`, called once per matrix with `W (m, n)`
        as the engine read it (float32, or bf16/fp16 as stored on the gram64 route; a float64
        checkpoint is seen rounded to float32, like its spectrum), on the compute device or
        the CPU. Must be a pure function of W: its results are cached with the spectrum.
    """

    names: tuple[str, ...]
    compute: Callable[[MatrixRef, torch.Tensor], Mapping[str, Any]]


class MemoryBudgetWarning(UserWarning):
    """Some matrices need more working memory than the engine's budget; they were computed
    alone, chunked or on the CPU (the message says which)."""


class CheckpointLike(Protocol):
    """What the engine needs from `spectra.sources.checkpoint.Checkpoint`."""

    def matrices(self) -> list[MatrixRef]: ...

    def read_many(
        self, refs: Sequence[MatrixRef], *, dtype: torch.dtype, device: str
    ) -> Iterator[tuple[MatrixRef, torch.Tensor]]: ...

    def content_key(self, ref: MatrixRef) -> str: ...


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs, not what it computes (never part of a cache key).

    device: "auto" (cuda, then mps, then cpu), "cpu", "cuda[:N]", "mps".
    max_memory: working-memory budget in bytes for one batch (None: half the free GPU memory,
        or 1 GiB on the CPU).
    prefetch: read the next batch on a background thread.
    """

    device: str | torch.device = "auto"
    max_memory: int | float | None = None
    prefetch: bool = True

    def __post_init__(self) -> None:
        check_max_memory(self.max_memory)


@overload
def compute_spectra(
    ckpt: CheckpointLike,
    matrices: Sequence[MatrixRef] | None = None,
    options: SpectrumOptions | None = None,
    *,
    engine: EngineOptions | None = None,
    cache: SpectrumCache | None = None,
    progress: ProgressFn | None = None,
    extras: MatrixExtras | None = None,
    then: None = None,
) -> Iterator[Spectrum]: ...


@overload
def compute_spectra(
    ckpt: CheckpointLike,
    matrices: Sequence[MatrixRef] | None = None,
    options: SpectrumOptions | None = None,
    *,
    engine: EngineOptions | None = None,
    cache: SpectrumCache | None = None,
    progress: ProgressFn | None = None,
    extras: MatrixExtras | None = None,
    then: Callable[[Spectrum], R],
) -> Iterator[R]: ...


def compute_spectra(
    ckpt: CheckpointLike,
    matrices: Sequence[MatrixRef] | None = None,
    options: SpectrumOptions | None = None,
    *,
    engine: EngineOptions | None = None,
    cache: SpectrumCache | None = None,
    progress: ProgressFn | None = None,
    extras: MatrixExtras | None = None,
    then: Callable[[Spectrum], R] | None = None,
) -> Iterator[Spectrum] | Iterator[R]:
    """Spectra of `matrices` (MatrixRefs of `ckpt`; default all of `ckpt.matrices()`).

    options: what to compute (SpectrumOptions; default all singular values, mode "values").
    engine: where and how (EngineOptions: device, memory budget, prefetch; default "auto").
    cache: a SpectrumCache to reuse and store results (None: no cache).
    progress: called as progress(done, total, bytes_read) after each yielded Spectrum.
    extras: per-matrix values computed while W is in memory, returned in `Spectrum.extras`
        and cached with the spectrum (see MatrixExtras).
    then: yield `then(spectrum)` instead of each Spectrum, computed on a worker thread while
        the engine decomposes the next batch (step 6 of the module docstring). Results,
        progress calls and errors come exactly as from `then(s) for s in compute_spectra(...)`;
        `then` must be a pure function of its Spectrum (it may run a batch ahead of what
        the caller has taken).

    Arguments are validated when called; the work happens as the iterator is consumed.

    >>> from spectra.sources.bundled import bundled_model_path  # doctest: +SKIP
    >>> from spectra.sources.checkpoint import Checkpoint  # doctest: +SKIP
    >>> with Checkpoint.open(bundled_model_path()) as ck:  # doctest: +SKIP
    ...     tops = list(compute_spectra(ck, options=SpectrumOptions(mode="topk", k=8)))
    """
    opts = SpectrumOptions() if options is None else options
    run = EngineOptions() if engine is None else engine
    refs = list(ckpt.matrices() if matrices is None else matrices)
    stream = _Run(ckpt, refs, opts, run, cache, progress, extras)
    return stream.stream(run.prefetch, then)


class ShardMemo(Protocol):
    """Where shard digests come from (a SpectrumCache: its persistent memo, hashing on a miss)."""

    def shard_record(self, path: str | Path) -> ShardDigest: ...


def matrix_content_key(
    ckpt: CheckpointLike,
    ref: MatrixRef,
    cache: ShardMemo | None,
    records: dict[str, ShardDigest] | None = None,
) -> str:
    """Content key of `ref`'s bytes as `ckpt` presents them.

    A plain `Checkpoint` with its shard on disk: `sha256(shard):offset:nbytes:dtype:MxN[:T]`,
    with the shard digest from the cache's persistent memo. Anything else (a Hub shard not on
    disk, a checkpoint with an adapter applied, a shuffled view, which read other numbers from
    the same bytes): `ckpt.content_key(ref)`, its own key.

    records: per-run digests by the shard's realpath, reused and filled here, so one run hashes
        a shard at most once and can `confirm_unchanged` it before storing what it read.
    """
    tensor = getattr(ref, "tensor", None)
    shard = getattr(tensor, "shard", None)
    encoded = getattr(ref, "encoded", None)
    if encoded is not None and any(p.shard != shard for p in encoded.parts):
        return ckpt.content_key(ref)  # decoded from several shards: the checkpoint's own key
    if cache is None or shard is None or not os.path.isfile(shard):
        return ckpt.content_key(ref)
    real = os.path.realpath(shard)
    record = records.get(real) if records is not None else None
    plain = getattr(type(ckpt), "content_key", None) is Checkpoint.content_key
    if record is None:
        record = cache.shard_record(shard) if plain else shard_record(shard)
    if not plain:
        text = ckpt.content_key(ref)
        if record.sha256 not in text:  # the shard changed between the two digests
            record = confirm_unchanged(real, record)
    if records is not None:
        records[real] = record
    if not plain:
        return text
    m, n = ref.shape
    tail = ":T" if getattr(ref, "transpose", False) else ""
    codec = "" if encoded is None else f":{encoded.codec.key()}"
    return f"{record.sha256}:{ref.offset}:{ref.nbytes}:{tensor.dtype}:{m}x{n}{tail}{codec}"


@dataclass(frozen=True)
class ContentKey:
    """A matrix's content key (`text`, as `matrix_content_key` makes it) and the shard digest
    it was made of, to confirm before caching what was computed from bytes read after it."""

    text: str
    shard: str | None = None
    record: ShardDigest | None = None

    def confirm(self) -> None:
        """SourceError unless the shard still holds the bytes the key was made of (call after
        reading the matrix, before storing what was computed from it)."""
        if self.shard is not None and self.record is not None:
            confirm_unchanged(self.shard, self.record)


def content_key_of(ckpt: CheckpointLike, ref: MatrixRef, cache: SpectrumCache) -> ContentKey:
    """`matrix_content_key` with its shard digest: take it before reading the matrix."""
    records: dict[str, ShardDigest] = {}
    text = matrix_content_key(ckpt, ref, cache, records)
    ((shard, record),) = records.items() or ((None, None),)
    return ContentKey(text, shard, record)


class _Run:
    """State of one compute_spectra call: plan, reorder buffer, progress counters."""

    def __init__(
        self,
        ckpt: CheckpointLike,
        refs: list[MatrixRef],
        opts: SpectrumOptions,
        engine: EngineOptions,
        cache: SpectrumCache | None,
        progress: ProgressFn | None,
        extras: MatrixExtras | None,
    ) -> None:
        self.ckpt, self.refs, self.opts = ckpt, refs, opts
        self.device = device = resolve_device(engine.device)
        budget = memory_budget(device, engine.max_memory)
        self.cache, self.progress, self.extras = cache, progress, extras
        self.read_dtype = opts.work_dtype()
        self.narrow = opts.mode == "values" and resolve_route(opts.route, device) == "gram64"
        self.keys: list[str | None] = [None] * len(refs)
        self.shards: dict[str, ShardDigest] = {}  # realpath -> the digest the keys were made of
        self.cached: set[int] = set()
        # per batch: halved when prefetching, since two batches are alive then
        self.total_budget = budget
        self.budget = budget // 2 if engine.prefetch else budget
        self.gate = MemoryGate(budget)  # the batch computing + the batch being read
        self.ready: dict[int, Spectrum] = {}
        self.next = 0
        self.bytes_read = 0
        self.oversize: dict[tuple[int, int], Oversize | None] = {}
        self.then: Lagged[Spectrum, Any] | None = None  # compute_spectra's `then` on a worker
        self.hashes: _ShardHashes | None = None  # shard digests hashed on a worker
        self.unhashed: dict[int, str] = {}  # matrix -> realpath of its shard being hashed
        self.taken_failed = False

    def stream(self, background: bool, then: Callable[[Spectrum], Any] | None) -> Iterator[Any]:
        self._lookup_cache()
        batches = self._batches()
        planned = [i for b in batches for i in b.indices]
        self._refuse_unholdable(planned)
        self._warn_oversize(planned)
        loaded = prefetch((self._read(b, gated=background) for b in batches), enabled=background)
        if then is not None:
            self.then = Lagged(then, name="spectra-then")
        try:
            try:
                yield from self._drain()
                for batch, W in loaded:
                    # results of every drain but the last are out before the next batch computes
                    yield from self._taken(keep=1)
                    if W is not None:
                        self._compute(batch, W)
                    del W
                    if background:
                        self.gate.release(self._batch_bytes(batch))
                    yield from self._drain()
                yield from self._drain()
            except Exception:
                if not self.taken_failed:  # a read or compute error: sequentially, every
                    yield from self._taken(keep=0)  # earlier result came before it
                raise
            yield from self._taken(keep=0)
        finally:
            if self.hashes is not None:
                self.hashes.close()
            if self.then is not None:
                self.then.close()
            self.gate.close()  # a reader waiting on the gate returns, so the prefetch can stop
            loaded.close()

    def _taken(self, keep: int) -> Iterator[Any]:
        """`then`'s results of every drained group but the last `keep`, in order, each followed
        by the progress call a sequential loop made after it."""
        if self.then is None:
            return
        try:
            for (done, nbytes), result in self.then.take(keep):
                yield result
                if self.progress is not None:
                    self.progress(done, len(self.refs), nbytes)
        except BaseException:
            self.taken_failed = True  # then's or progress's error (or the caller closed us)
            raise

    def _batches(self) -> list[Batch]:
        """Equal-shape batches under the memory budget, planned within each read group of the
        checkpoint (`read_groups`: shards a streamed Hub checkpoint can hold on disk at once),
        group after group, so every shard is read (downloaded) once; one group for local files."""
        shapes = [tuple(r.shape) for r in self.refs]
        read_groups = getattr(self.ckpt, "read_groups", None)
        todo = [i for i in range(len(self.refs)) if i not in self.cached]
        if read_groups is None or not todo:
            return plan_batches(shapes, self._estimate, self.budget, skip=self.cached)
        groups = read_groups([self.refs[i] for i in todo])
        batches: list[Batch] = []
        for group in groups:
            inside = {todo[j] for j in group}
            outside = [i for i in range(len(self.refs)) if i not in inside]
            batches += plan_batches(shapes, self._estimate, self.budget, skip=outside)
        return batches

    def _estimate(self, shape: tuple[int, int]) -> int:
        return self.opts.bytes_per_matrix(shape, self.device)

    def _batch_bytes(self, batch: Batch) -> int:
        return self._estimate(batch.shape) * len(batch.indices)

    def _lookup_cache(self) -> None:
        """Cache keys of every matrix whose shard digest is known (remembered in the cache's
        memo, or not a shard's); the shards still to hash go to a worker thread, hashed in
        order of first use while the first batches compute, and their matrices get their keys
        when their batch is read (`_resolve`)."""
        if self.cache is None:
            return
        memo = _MemoOnly(self.cache)
        waiting: dict[str, list[int]] = {}
        for i, ref in enumerate(self.refs):
            try:
                content = matrix_content_key(self.ckpt, ref, memo, self.shards)
            except _Unhashed as miss:
                waiting.setdefault(miss.path, []).append(i)
                continue
            self._set_key(i, content)
        if waiting:
            self.unhashed = {i: real for real, ids in waiting.items() for i in ids}
            self.hashes = _ShardHashes(self.cache, list(waiting))

    def _set_key(self, i: int, content: str) -> None:
        """Matrix i's cache key from its content key; marked cached when the cache has it."""
        cache = self.cache
        assert cache is not None
        key = cache.entry_key(content, self.opts.params(tuple(self.refs[i].shape), self.device))
        self.keys[i] = key
        if cache.contains(key):
            self.cached.add(i)

    def _resolve(self, batch: Batch) -> Batch:
        """`batch` without the matrices found in the cache once their shard's digest (hashed
        on the worker) is known; their keys are set here, before their bytes are read."""
        if not self.unhashed or not any(i in self.unhashed for i in batch.indices):
            return batch
        assert self.hashes is not None
        for i in batch.indices:
            real = self.unhashed.pop(i, None)
            if real is not None:
                self.shards.setdefault(real, self.hashes.digest(real))
                self._set_key(
                    i, matrix_content_key(self.ckpt, self.refs[i], self.cache, self.shards)
                )
        return Batch(tuple(i for i in batch.indices if i not in self.cached), batch.shape)

    def _batch_dtype(self, batch: Batch) -> torch.dtype:
        """bf16/fp16 as stored on the gram64 route (exact upcast later), else float32/64."""
        if self.narrow:
            stored = {
                getattr(getattr(self.refs[i], "tensor", None), "dtype", None) for i in batch.indices
            }
            if len(stored) == 1 and (narrow := _NARROW_READS.get(str(stored.pop()))) is not None:
                return narrow
        return self.read_dtype

    def _read(self, batch: Batch, *, gated: bool = False) -> tuple[Batch, torch.Tensor | None]:
        """Read `batch` into one `(b, m, n)` CPU tensor (pinned when computing on CUDA), less
        its matrices found in the cache once their shard was hashed (None when that is all)."""
        batch = self._resolve(batch)
        if gated:
            self.gate.acquire(self._batch_bytes(batch))
        if not batch.indices:
            return batch, None
        try:
            return self._read_batch(batch)
        except MemoryError:
            m, n = batch.shape
            raise SourceError(
                f"cannot allocate memory to read {len(batch.indices)} matrix(es) of {m} x {n} "
                f"(first: {self.refs[batch.indices[0]].key!r}): pass a smaller --max-memory, "
                "leave them out with --exclude, or free memory"
            ) from None

    def _read_batch(self, batch: Batch) -> tuple[Batch, torch.Tensor]:
        m, n = batch.shape
        dtype = self._batch_dtype(batch)
        wanted = [self.refs[i] for i in batch.indices]
        pin = self.device.type == "cuda"
        if len(wanted) == 1 and not pin:
            ((_, t),) = list(self.ckpt.read_many(wanted, dtype=dtype, device="cpu"))
            # no second copy of a lone matrix
            return batch, t.to(dtype).reshape(1, m, n).contiguous()
        W = torch.empty((len(batch.indices), m, n), dtype=dtype, pin_memory=pin)
        slots: dict[str, list[int]] = {}
        for j, i in enumerate(batch.indices):
            slots.setdefault(self.refs[i].key, []).append(j)
        for ref, t in self.ckpt.read_many(wanted, dtype=dtype, device="cpu"):
            W[slots[ref.key].pop(0)].copy_(t)
        return batch, W

    def _plan(self, shape: tuple[int, int]) -> Oversize | None:
        if shape not in self.oversize:
            self.oversize[shape] = oversize_plan(self.opts, shape, self.budget, self.device)
        return self.oversize[shape]

    def _refuse_unholdable(self, planned: list[int]) -> None:
        """A matrix over the budget is still read whole into host memory: refuse, before any
        allocation, one that this machine cannot hold (a header may claim 10^12 elements in a
        sparse file); within the machine, a failed allocation is a one-line error in `_read`."""
        for i in planned:
            if self._plan(tuple(self.refs[i].shape)) is None:
                continue
            m, n = self.refs[i].shape
            require_host_memory(
                m * n * self.read_dtype.itemsize,
                f"matrix {self.refs[i].key!r} ({m} x {n}, read as {self.read_dtype})",
                "leave it out with --exclude, or run on a machine with more memory",
            )

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
            f"of {_mib(self.total_budget)} on {self.device}{self._split()} "
            f"(largest: {self.refs[worst].key!r}, "
            f"{m} x {n}, about {_mib(plan.need)}); they are computed one at a time, the largest "
            f"{plan.describe()}. "
            "Pass a larger max_memory if the device has room.",
            MemoryBudgetWarning,
            stacklevel=4,
        )

    def _split(self) -> str:
        """How the budget is shared: a warning that quoted only the per-batch half made
        `--max-memory 16` read as an 8 MiB budget."""
        if self.budget == self.total_budget:
            return ""
        return f", {_mib(self.budget)} for each of the two batches alive at once"

    def _compute(self, batch: Batch, W: torch.Tensor) -> None:
        names = [self.refs[i].key for i in batch.indices]
        self.bytes_read += sum(int(self.refs[i].nbytes) for i in batch.indices)
        plan = self._plan(batch.shape) if len(batch.indices) == 1 else None
        if plan is not None and plan.gram_block is not None:
            # W stays on the CPU; slices go to plan.device one at a time
            extra = self._extras(batch, W)
            specs = decompose_batch(
                W, self.opts, names=names, gram_block=plan.gram_block, device=plan.device
            )
        else:
            Wd = W.to(self.device if plan is None else plan.device, non_blocking=True)
            extra = self._extras(batch, Wd)
            specs = decompose_batch(Wd, self.opts, names=names)
            del Wd
        for i, spec, more in zip(batch.indices, specs, extra, strict=True):
            if more:
                spec = replace(spec, extras={**spec.extras, **more})
            self._store(i, spec)
            self.ready[i] = spec

    def _extras(self, batch: Batch, W: torch.Tensor) -> list[dict[str, Any]]:
        """`extras.compute` on each matrix of the batch `W (b, m, n)` ({} without extras)."""
        if self.extras is None:
            return [{} for _ in batch.indices]
        return [dict(self.extras.compute(self.refs[i], W[j])) for j, i in enumerate(batch.indices)]

    def _recompute(self, i: int) -> Spectrum:
        """One matrix, synchronously (its cache entry turned out corrupted)."""
        batch, W = self._read(Batch((i,), tuple(self.refs[i].shape)))
        assert W is not None  # i is resolved (cached): `_resolve` leaves the batch as it is
        self._compute(batch, W)
        return self.ready.pop(i)

    def _complete(self, i: int, spec: Spectrum) -> Spectrum:
        """A cached `spec` with every requested extra: the missing ones are computed from one
        read of the matrix (no decomposition) and stored in its cache entry."""
        if self.extras is None or all(n in spec.extras for n in self.extras.names):
            return spec
        batch, W = self._read(Batch((i,), tuple(self.refs[i].shape)))
        assert W is not None  # i is resolved (cached): `_resolve` leaves the batch as it is
        self.bytes_read += int(self.refs[i].nbytes)
        spec = replace(spec, extras={**spec.extras, **self._extras(batch, W)[0]})
        del W
        self._store(i, spec)
        return spec

    def _store(self, i: int, spec: Spectrum) -> None:
        """Cache `spec` (computed from matrix i as just read) under its key, once the shard is
        confirmed to hold the bytes the key's digest was made of: a file rewritten since the
        lookup is a SourceError, never spectra of other bytes under that digest."""
        key = self.keys[i]
        if self.cache is None or key is None:
            return
        shard = getattr(getattr(self.refs[i], "tensor", None), "shard", None)
        real = os.path.realpath(shard) if shard is not None else None
        record = self.shards.get(real) if real is not None else None
        if record is not None:
            self.shards[real] = confirm_unchanged(real, record)
        self.cache.put(key, spec)

    def _drain(self) -> Iterator[Spectrum]:
        """Yield every result that is next in input order (with `then`: hand each to it, as
        one group)."""
        if self.then is not None:
            yield from self._drain_into()
            self.then.end_group()
            return
        yield from self._drain_into()

    def _drain_into(self) -> Iterator[Spectrum]:
        while self.next < len(self.refs):
            i = self.next
            if i in self.ready:
                spec = self.ready.pop(i)
            elif i in self.cached:
                spec = self.cache.get(self.keys[i]) if self.cache else None
                spec = self._recompute(i) if spec is None else self._complete(i, spec)
            else:
                return
            ref = self.refs[i]
            spec = spec.with_meta(key=ref.key, role=ref.role, layer=ref.layer)
            if self.then is not None:
                # its progress call comes after its result is taken (`_taken`)
                self.then.add(spec, tag=(self.next + 1, self.bytes_read))
                self.next += 1
                continue
            yield spec
            self.next += 1
            if self.progress is not None:
                self.progress(self.next, len(self.refs), self.bytes_read)


class _Unhashed(Exception):
    """A shard's digest is not in the cache's memo: it has to be hashed (`path`: realpath)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


def _unhashed(path: Path) -> ShardDigest:
    raise _Unhashed(str(path))


class _MemoOnly:
    """A SpectrumCache's shard memo that never hashes: a miss raises `_Unhashed`."""

    def __init__(self, cache: SpectrumCache) -> None:
        self.cache = cache

    def shard_record(self, path: str | Path) -> ShardDigest:
        return self.cache.shard_record(path, compute=_unhashed)


class _ShardHashes:
    """Digests of `shards` (realpaths) by `cache.shard_record` (hashed, and remembered in the
    memo when settled), computed one after another on a daemon thread, in the given order;
    `digest(shard)` waits for one and raises its error. A daemon: Ctrl-C or the end of the
    process does not wait for a multi-GB hash to finish."""

    def __init__(self, cache: SpectrumCache, shards: list[str]) -> None:
        self.futures: dict[str, Future[ShardDigest]] = {s: Future() for s in shards}
        self.stop = threading.Event()
        work = threading.Thread(
            target=self._work, args=(cache, shards), name="spectra-hash", daemon=True
        )
        work.start()

    def _work(self, cache: SpectrumCache, shards: list[str]) -> None:
        for shard in shards:
            future = self.futures[shard]
            if self.stop.is_set() or not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(cache.shard_record(shard))
            except BaseException as exc:  # noqa: BLE001 - raised by `digest` in the reader
                future.set_exception(exc)

    def digest(self, shard: str) -> ShardDigest:
        return self.futures[shard].result()

    def close(self) -> None:
        self.stop.set()
        for future in self.futures.values():
            future.cancel()


def _mib(nbytes: int) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (KiB at least)."""
    for unit, shift in (("GiB", 30), ("MiB", 20)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):,.1f} {unit}"
    return f"{nbytes / 1024:,.1f} KiB"
