"""`compare(base, finetuned)`: the compare job. Intruder dimensions, update statistics, subspace
drift and HT-SR change for every matrix pair of a fine-tune (or a PEFT LoRA adapter) against its
base, plus model-level forensics, as a `Comparison`; in one process or split over torchrun ranks.

1. `open_adapter` says whether FINETUNED is a PEFT adapter folder (then only adapted matrices
   are compared, and dW = scale * B @ A comes from the factors, never formed);
2. `plan_pairs`: the selected base matrices, paired by name (`--map` renames) with the
   fine-tuned matrices or the adapter's modules (analysis.pairing), with their errors;
3. `compare_one` per pair: read both sides (one pair at a time, so memory is bounded by the
   largest pair), the base's float64 left singular vectors from the spectrum cache when there is
   one (`base_svd`), then the pure `compare_pair` (analysis.pair);
4. forensics over all pairs and the `Comparison` (analysis.comparison).
Per pair the base gets one float64 Gram eigendecomposition (its full thin U is needed by the
intruder test), the fine-tune one (all values for alpha, top-k vectors only), and dW its Gram
eigenvalues. Definitions: docs/methods.md section 3.

Under torchrun every rank plans the same pairs (headers only); the pairs are partitioned by
estimated cost (two float64 decompositions of the pair's shape plus the bytes of both sides);
each rank computes its share with the same `compare_one`; statuses are exchanged (a failed rank
fails every rank with its message); rank 0 gathers the results in pairing order and builds the
same Comparison (forensics over all pairs); the other ranks return None.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from spectra.analysis.compare_inputs import open_adapter
from spectra.analysis.comparison import CompareOptions, Comparison
from spectra.analysis.drift import left_singular
from spectra.analysis.forensics import comparison_forensics
from spectra.analysis.pair import PairMeta, PairResult, compare_pair
from spectra.analysis.pairing import Pairing, pair_adapter, pair_matrices
from spectra.analysis.results import runtime_versions
from spectra.device import resolve_device
from spectra.distributed.failures import RERUN, RESUME_FROM_CACHE, Tracker, guarded, settle
from spectra.distributed.gather import gather_results
from spectra.distributed.hub import open_checkpoint
from spectra.distributed.partition import matrix_cost, shard_items
from spectra.distributed.runtime import (
    Session,
    apply_threads,
    distributed_session,
    is_distributed,
)
from spectra.errors import ValidationError
from spectra.fields import check_instance, check_value
from spectra.formats.files import check_source
from spectra.linalg.cache import SpectrumCache, resolve_cache
from spectra.linalg.engine import ContentKey, content_key_of
from spectra.linalg.spectrum import Spectrum
from spectra.sources.adapters import LoraAdapter
from spectra.sources.checkpoint import Checkpoint
from spectra.sources.hub_options import HubOptions
from spectra.sources.roles import MatrixRef

Progress = Callable[[int, int, str], None]  # (done, total, key of the pair just finished)
CacheSpec = SpectrumCache | str | Path | bool | None
Opener = Callable[[str | Path, HubOptions], AbstractContextManager[Checkpoint]]


@dataclass(frozen=True)
class _Job:
    """What every pair of one compare() call shares."""

    options: CompareOptions
    device: torch.device
    cache: SpectrumCache | None
    progress: Progress | None
    session: Session | None  # None: one process, every pair here


def compare(
    base: str | Path,
    finetuned: str | Path,
    options: CompareOptions | None = None,
    *,
    cache: CacheSpec = None,
    progress: Progress | None = None,
    threads: int | None = None,
    timeout_s: float | None = None,
    hub: HubOptions | tuple[HubOptions, HubOptions] | None = None,
) -> Comparison | None:
    """Compare a fine-tuned checkpoint (or PEFT LoRA adapter folder) with its base.

    base, finetuned: anything `Checkpoint.open` accepts; `finetuned` may be a PEFT LoRA adapter
        folder (adapter_config.json + adapter_model.safetensors): then only adapted matrices
        are compared and dW = scale * B @ A comes from the factors.
    options: CompareOptions (k, epsilons, --map rules, selection, allow_missing, device).
    cache: reuse the base's float64 left singular vectors and values (full thin U and S) across
        comparisons: a SpectrumCache, a folder, True (the default cache folder) or None/False
        (default: no cache; an entry holds U in float64, about twice the base matrix's float32
        size; 6.6 GB for a 1B base). A second adapter of a cached base compares 1.8x faster.
    progress: called as progress(done, total, key) after each pair.
    threads: per-process intra-op threads (or $SPECTRA_NUM_THREADS; reproducibility contract).
    timeout_s: under torchrun, how long a rank waits for the others (default one hour).
    hub: how Hub repo ids are opened (HubOptions), one for both sides or a (base, finetuned)
        pair; under a disk budget both sides are held on disk at once, so give each half.

    Raises ValidationError listing shape mismatches and one-sided keys unless `allow_missing`.
    Returns the Comparison; under torchrun on rank 0 only, None on the other ranks.

    >>> opts = CompareOptions(epsilons=(0.5, 0.9))                       # doctest: +SKIP
    >>> cmp = compare("base/", "finetuned/", opts)                      # doctest: +SKIP
    >>> cmp.forensics.update_kind, cmp.forensics.intruders_total        # doctest: +SKIP
    ('low-rank', {'0.5': 12, '0.9': 40})
    """
    check_source(base, "base")
    check_source(finetuned, "finetuned")
    check_instance(options, CompareOptions, "options")
    check_value(cache, CacheSpec, "cache")
    check_value(progress, Progress | None, "progress")
    opts = CompareOptions() if options is None else options
    hubs = _sides(hub)
    if not is_distributed():
        apply_threads(threads)
        job = _Job(opts, resolve_device(opts.device), resolve_cache(cache), progress, None)
        return _compare(job, base, finetuned, _open_here, hubs)
    with distributed_session(device=opts.device, threads=threads, timeout_s=timeout_s) as s:
        job = _Job(opts, s.device, resolve_cache(cache), progress, s)
        return _compare(job, base, finetuned, partial(open_checkpoint, s), hubs)


def _sides(hub: HubOptions | tuple[HubOptions, HubOptions] | None) -> tuple[HubOptions, ...]:
    """The (base, finetuned) Hub options of `compare`'s `hub` argument."""
    if hub is None:
        return (HubOptions(), HubOptions())
    sides = (hub, hub) if isinstance(hub, HubOptions) else tuple(hub)
    if len(sides) != 2 or not all(isinstance(h, HubOptions) for h in sides):
        raise ValidationError(
            f"hub must be a HubOptions or a (base, finetuned) pair of them, got {hub!r:.80}"
        )
    return sides


def _open_here(source: str | Path, hub: HubOptions) -> Checkpoint:
    return Checkpoint.open(
        source, revision=hub.revision, local_only=hub.local_only, disk_budget=hub.disk_budget
    )


def _compare(
    job: _Job,
    base: str | Path,
    finetuned: str | Path,
    open_ckpt: Opener,
    hubs: tuple[HubOptions, ...],
) -> Comparison | None:
    adapter = open_adapter(finetuned)
    with open_ckpt(base, hubs[0]) as base_ckpt:
        if adapter is not None:
            with adapter:
                done = _pairs(job, base_ckpt, adapter)
            commits = {"base": base_ckpt.commit}
        else:
            with open_ckpt(finetuned, hubs[1]) as ft_ckpt:
                done = _pairs(job, base_ckpt, ft_ckpt)
            commits = {"base": base_ckpt.commit, "finetuned": ft_ckpt.commit}
    if done is None:  # a rank other than 0
        return None
    pairing, results = done
    opts = job.options
    return Comparison(
        base=str(base),
        finetuned=str(finetuned),
        mode="lora" if adapter is not None else "checkpoint",
        options=opts,
        pairs=tuple(results),
        pairing=pairing,
        forensics=comparison_forensics(results, opts.epsilons, unchanged_tol=opts.unchanged_tol),
        versions=runtime_versions(),
        commits={side: sha for side, sha in commits.items() if sha},
    )


def _pairs(
    job: _Job, base: Checkpoint, finetuned: Checkpoint | LoraAdapter
) -> tuple[Pairing, list[PairResult]] | None:
    """The pairing and every pair's result in pairing order (None on ranks other than 0)."""
    pairing, b_refs = plan_pairs(base, finetuned, job.options)
    if job.session is None:
        results = []
        for i, (b_key, f_key) in enumerate(pairing.pairs):
            results.append(_compare_one(base, b_refs[b_key], finetuned, f_key, job))
            if job.progress is not None:
                job.progress(i + 1, len(pairing.pairs), b_key)
        return pairing, results
    merged = _split(job, job.session, base, finetuned, (pairing, b_refs))
    return None if merged is None else (pairing, merged)


# ------------------------------------------------------------------ planning the pairs


def plan_pairs(
    base: Checkpoint, finetuned: Checkpoint | LoraAdapter, opts: CompareOptions
) -> tuple[Pairing, dict[str, MatrixRef]]:
    """The pairs compare() computes and the selected base matrices by key, with its checks and
    errors (the same on every torchrun rank)."""
    b_refs = _select(base, opts)
    if isinstance(finetuned, LoraAdapter):
        targets = {name: m.base_key for name, m in finetuned.modules.items()}
        every = [m.key for m in base.matrices()]
        pairing = pair_adapter(list(b_refs), targets, opts.map, str(base.source), all_keys=every)
        return pairing, b_refs
    f_refs = _select(finetuned, opts)
    pairing = pair_matrices(
        {k: m.shape for k, m in b_refs.items()}, {k: m.shape for k, m in f_refs.items()}, opts.map
    )
    _check_pairing(pairing, opts, base.source, finetuned.source)
    return pairing, b_refs


def _select(ckpt: Checkpoint, opts: CompareOptions) -> dict[str, MatrixRef]:
    refs = ckpt.matrices(include=opts.include, exclude=opts.exclude, roles=opts.roles)
    return {m.key: m for m in refs}


def _check_pairing(pairing: Pairing, opts: CompareOptions, base: str, ft: str) -> None:
    problems = pairing.problems()
    if pairing.mismatched or (problems and not opts.allow_missing):
        raise ValidationError(
            f"{base} and {ft} do not pair up: {problems}. Rename keys with --map "
            "'regex=>replacement', narrow with --include/--exclude/--roles"
            + ("" if pairing.mismatched else ", or pass --allow-missing to compare the rest")
        )
    if not pairing.pairs:
        raise ValidationError(f"no matrix of {ft} pairs with one of {base}: nothing to compare")


# ------------------------------------------------------------------ one pair


def _compare_one(
    base: Checkpoint,
    ref: MatrixRef,
    finetuned: Checkpoint | LoraAdapter,
    ft_key: str,
    job: _Job,
) -> PairResult:
    """Read one pair (the fine-tuned matrix, or the adapter's factors for `ft_key`) and compare
    it; the base's U comes from the cache when there is one. The one per-pair step of compare()
    in one process and on every torchrun rank, so both give the same bits."""
    dev, opts = job.device, job.options
    dtype = torch.float32 if dev.type == "mps" else torch.float64
    # the cache key before the read, so the base's U is cached only for the bytes read here
    key = content_key_of(base, ref, job.cache) if job.cache is not None else None
    w0 = read_side(base, ref, dev)
    w1, lora = None, None
    if isinstance(finetuned, LoraAdapter):
        a, b, scale = finetuned.read_factors(ft_key, dtype=dtype, device=str(dev))
        lora = (a, b, float(scale))
    else:
        w1 = read_side(finetuned, ft_key, dev)
    return compare_pair(
        w0,
        w1,
        lora=lora,
        meta=PairMeta(key=ref.key, ft_key=ft_key, role=ref.role, layer=ref.layer),
        k=opts.k,
        epsilons=opts.epsilons,
        unchanged_tol=opts.unchanged_tol,
        base_svd=partial(base_svd, key, w0, job.cache),  # after the fine-tune's vectors
    )


# Read as stored: compare_pair upcasts these exactly, slice by slice (a bf16 32000 x 2048 matrix is
# held as 125 MiB, not as a 500 MiB float64 copy); anything else (fp8; quantized and GGUF
# matrices decode to float32) as float32, which holds its values exactly.
AS_STORED = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def read_side(ckpt: Checkpoint, ref: MatrixRef | str, device: torch.device) -> torch.Tensor:
    """One side of a pair as compare_pair takes it: in its stored float dtype when that is one
    of AS_STORED, else float32 (always float32 on MPS, which has no float64)."""
    if device.type == "mps":
        return ckpt.read(ref, dtype=torch.float32, device=str(device))
    w = ckpt.read(ref, dtype=None, device=str(device))
    return w if w.dtype in AS_STORED else w.to(torch.float32)


# U from the float64 Gram eigenvectors (drift.left_singular); entries stored by the earlier
# full-SVD route (mode "compare-base-svd") are not reused, so cached and fresh runs agree bit
# for bit.
BASE_SVD_PARAMS = {"mode": "compare-base-gram", "dtype": "float64", "full_u": True}


def base_svd(
    content: ContentKey | None, w0: torch.Tensor, cache: SpectrumCache | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(U (m, M), S (M,)) of the base matrix from the cache, computing and storing it on a miss;
    None without a cache (compare_pair then computes it). Keyed by the matrix's content, taken
    (`content_key_of`) before `w0` was read and confirmed before storing."""
    if cache is None or content is None:
        return None
    content.confirm()  # w0 is the version of the bytes the key names
    key = cache.entry_key(content.text, BASE_SVD_PARAMS)
    hit = cache.get(key)
    work = torch.float32 if w0.device.type == "mps" else torch.float64  # left_singular's dtype
    if hit is not None and hit.U is not None and hit.U.dtype == work:
        return hit.U.to(w0.device), hit.values.to(device=w0.device, dtype=work)
    u, s = left_singular(w0)
    spec = Spectrum(
        values=s.cpu().to(torch.float64),
        U=u,  # as it is (column-major from the QR, maybe on a GPU): the cache streams its rows
        Vh=None,
        method="gram64",
        params=dict(BASE_SVD_PARAMS),
        shape=(int(w0.shape[0]), int(w0.shape[1])),
    )
    cache.put(key, spec)
    return u, s


# ------------------------------------------------------------------ the torchrun split


def _split(
    job: _Job,
    session: Session,
    base: Checkpoint,
    finetuned: Checkpoint | LoraAdapter,
    plan: tuple[Pairing, dict[str, MatrixRef]],
) -> list[PairResult] | None:
    """This rank's share of the pairs, computed; every result on rank 0, None elsewhere."""
    pairing, b_refs = plan
    refs = [b_refs[b] for b, _ in pairing.pairs]
    env = session.env
    mine = shard_items(refs, env.rank, env.world_size, cost=lambda r: 2 * matrix_cost(r))

    def work(tracker: Tracker) -> list[tuple[int, PairResult]]:
        out = []
        for done, i in enumerate(mine):
            b_key, f_key = pairing.pairs[i]
            tracker.step(b_key)
            out.append((i, _compare_one(base, b_refs[b_key], finetuned, f_key, job)))
            if job.progress is not None:
                job.progress(done + 1, len(mine), b_key)
        return out

    status, part = guarded(session, work)
    settle(session, status, RERUN if job.cache is None else RESUME_FROM_CACHE)
    return gather_results(session, part or [], len(pairing.pairs))
