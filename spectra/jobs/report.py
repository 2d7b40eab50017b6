"""`analyze()`: the report job. HT-SR metrics of every weight matrix of a checkpoint, as an
`Analysis`, in one process or split over torchrun ranks.

One streaming pass over the checkpoint, memory-bounded, plus one more only for the randomized
control:
1. spectra: `compute_spectra` in mode "values" (the engine batches equal shapes, uses the
   spectrum cache; default exact route: float64 Gram eigenvalues, which reproduces
   WeightWatcher's alphas, docs/methods.md section 2), then the pure per-matrix metrics
   (analysis.htsr), and the MP edge when asked (no extra decomposition), computed on the
   engine's worker thread while it decomposes the next batch (`compute_spectra(then=...)`:
   same results, progress calls and errors as fitting each spectrum as it arrives). The
   outlier ratio (on by default) is an engine `MatrixExtras`: computed from each matrix while
   the engine holds it, and cached with its spectrum under a key naming the multiplier (a pure
   function of the same bytes), so neither a cold nor a cached run reads the weights twice for
   it.
2. only with `randomize`: the engine decomposes the entry-shuffled matrices (`ShuffledView`:
   same batching and memory budget, no cache): one extra read and one extra exact spectrum
   per matrix.

Under torchrun with N processes (spectra.distributed is the runtime):
1. every rank opens the checkpoint (Hub shards once per node) and lists the same matrices in
   the same order (headers only);
2. each rank takes its share (contiguous runs of shards, balanced by estimated seconds) and
   runs the same per-matrix code a single process runs, on its own device, reading and writing
   the shared spectrum cache;
3. statuses are exchanged: if any rank failed, every rank raises one `DistributedError` naming
   the rank, the matrix and the error;
4. rank 0 gathers the per-matrix results in single-process order and builds the `Analysis` a
   single process builds (the model summary is computed from the full list); the other ranks
   return None.
Per-matrix numbers are bit-for-bit those of a single process with the same per-process thread
count (`threads=` or $SPECTRA_NUM_THREADS) and device type on the CPU; batches of equal shapes
are formed per rank, which may move GPU results in the last bits (docs/scaling.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spectra.analysis.bootstrap import bootstrap_alpha
from spectra.analysis.detx import detx_constraint
from spectra.analysis.expert_overlap import (
    DEFAULT_K,
    effective_k,
    expert_overlap,
    top_basis,
    width_side,
)
from spectra.analysis.fingers import WW_DEFAULT_MAX_FINGERS, FitOptions, fit_tail
from spectra.analysis.htsr import (
    WEAK_RANK_TOL,
    MatrixMeta,
    failed_layer,
    layer_metrics,
    weak_rank_loss,
)
from spectra.analysis.moe import moe_summary
from spectra.analysis.mp import MPFit
from spectra.analysis.mp import mp_fit as fit_mp
from spectra.analysis.mp_kde import mp_fit_kde
from spectra.analysis.outliers import DEFAULT_MULTIPLIER, outlier_ratio
from spectra.analysis.randomized import DEFAULT_SEED, ShuffledView, esd_distance
from spectra.analysis.results import (
    Analysis,
    ExpertOverlap,
    LayerMetrics,
    MoeSummary,
    SkippedMatrix,
    runtime_versions,
)
from spectra.analysis.summary import model_summary
from spectra.analysis.traps import find_traps
from spectra.analysis.vectors import COLUMNS as VECTOR_COLUMNS
from spectra.analysis.vectors import gram_eigvectors, localization
from spectra.device import resolve_device
from spectra.distributed.failures import Tracker, guarded, settle
from spectra.distributed.gather import gather_results
from spectra.distributed.hub import open_checkpoint
from spectra.distributed.partition import shard_items
from spectra.distributed.runtime import (
    Session,
    apply_threads,
    distributed_session,
    is_distributed,
)
from spectra.errors import ValidationError
from spectra.fields import check_fields, check_instance, check_value, str_tuple
from spectra.formats.files import check_source
from spectra.formats.peft import is_adapter_tensor
from spectra.formats.safetensors import clip
from spectra.linalg.cache import SpectrumCache, resolve_cache
from spectra.linalg.engine import EngineOptions, MatrixExtras, compute_spectra
from spectra.linalg.spectrum import Spectrum
from spectra.sources.bundled import bundled_model_path
from spectra.sources.checkpoint import Checkpoint
from spectra.sources.hub_options import HubOptions
from spectra.sources.roles import MatrixRef

MP_METHODS: dict[str, Callable[[np.ndarray, tuple[int, int]], MPFit | None]] = {
    "quantile": fit_mp,
    "ww": mp_fit_kde,
}
# Fit each matrix on the engine's worker thread while it decomposes the next batch
# (`compute_spectra(then=...)`); False: on this thread as each Spectrum arrives (same results).
FITS_ON_WORKER = True
Progress = Callable[[int, int, int], None]
"""progress(done_matrices, total_matrices, bytes_read), called by the engine per matrix"""
CacheSpec = SpectrumCache | str | Path | bool | None
Source = str | Path | Checkpoint | None


@dataclass(frozen=True)
class AnalyzeOptions:
    """What `analyze()` computes; recorded in `Analysis.options`.

    include/exclude: name globs; roles: e.g. ("q", "k", "v", "o", "up", "down").
    device: "auto" | "cpu" | "cuda[:N]" | "mps" for the decompositions.
    mp_fit: MP bulk edge and spike count (cheap: no extra decomposition).
    randomize: shuffled-entries control (one extra exact spectrum per matrix).
    outliers: weight-magnitude outlier ratio (computed on the spectrum pass's reads, cached).
    outlier_multiplier: M of the outlier ratio (share of |W_ij| > M * mean |W|; OwLore's 13).
    seed: seed of the randomized control's shuffles.
    mp_method: "quantile" (spectra's quantile fit of sigma, default) or "ww" (WeightWatcher
        0.7.7's brute-force KDE fit: its num_spikes, sigma_mp, mp_softrank); used by mp_fit and
        by the randomized control's rand_num_spikes.
    weak_rank_tol: weak_rank_loss counts eigenvalues below it (WeightWatcher's `tolerance`).
    min_evals / max_evals / max_n: size filters (None: off): a matrix with min(m, n) <
        min_evals, min(m, n) > max_evals or max(m, n) > max_n is not analyzed and is listed in
        `Analysis.skipped` with the reason. WeightWatcher's defaults are 8, 15000 and 50000.
    xmax / fix_fingers / xmin_max / max_fingers / finger_thresh: WeightWatcher's power-law fit
        options (analysis.fingers.FitOptions: drop the top xmax eigenvalues, or xmax="force":
        bound the power law at the largest one; "xmin_peak" or "clip_xmax" finger fixing).
    fit: "PL" | "TPL" | "E_TPL": WeightWatcher's fit (truncated power law: analysis.tpl; its
        cutoff in the Lambda column). fit_entropy: entropy of the KS distances over xmin.
    best_fit: the likelihood-ratio choice among power law, truncated power law, lognormal and
        exponential on the fitted tail (analysis.best_fit).
    ww_quirks: reproduce WeightWatcher 0.7.7's quirks of those options (xmin_peak's log10
        lower bound, clip_xmax's counting), only to compare numbers with it.
    detx: WeightWatcher's detX columns detX_num, detX_val (analysis.detx).
    vectors: WeightWatcher's vectors=True: localization of the singular vectors, bulk vs tail
        (analysis.vectors; one float64 eigendecomposition with vectors per matrix).
    alpha_ci: resamples of a seeded bootstrap interval for alpha (0: off; analysis.bootstrap),
        at level ci_level, seeded with `seed`.
    traps: correlation traps (analysis.traps): num_traps and where the largest sit (one full
        SVD of the shuffled matrix per matrix, shuffled with `seed`, MP fit of `mp_method`).
    expert_overlap: k of the expert similarity of a mixture-of-experts model
        (analysis.expert_overlap: overlap of the experts' top-k singular subspaces, per layer
        and role inside the expert; one more read and SVD of every routed expert); 0: off.
        No effect on a model without routed experts.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    device: str = "auto"
    mp_fit: bool = False
    randomize: bool = False
    outliers: bool = True
    outlier_multiplier: float = DEFAULT_MULTIPLIER
    seed: int = DEFAULT_SEED
    mp_method: str = "quantile"
    weak_rank_tol: float = WEAK_RANK_TOL
    min_evals: int | None = None
    max_evals: int | None = None
    max_n: int | None = None
    xmax: int | str | None = None
    fix_fingers: str | None = None
    xmin_max: float | None = None
    max_fingers: int = WW_DEFAULT_MAX_FINGERS
    finger_thresh: float = 1.0
    ww_quirks: bool = False
    detx: bool = False
    vectors: bool = False
    alpha_ci: int = 0
    ci_level: float = 0.95
    traps: bool = False
    expert_overlap: int = DEFAULT_K
    fit: str = "PL"
    fit_entropy: bool = False
    best_fit: bool = False

    def __post_init__(self) -> None:
        for name in ("include", "exclude", "roles"):
            object.__setattr__(self, name, str_tuple(getattr(self, name), f"AnalyzeOptions.{name}"))
        if isinstance(self.device, torch.device):
            object.__setattr__(self, "device", str(self.device))
        check_fields(self)
        if not self.outlier_multiplier > 0:
            raise ValidationError(
                f"outlier_multiplier must be > 0, got {self.outlier_multiplier!r}"
            )
        if self.mp_method not in MP_METHODS:
            raise ValidationError(
                f"mp_method must be one of {sorted(MP_METHODS)}, got {clip(str(self.mp_method))!r}"
            )
        if not self.weak_rank_tol >= 0:
            raise ValidationError(f"weak_rank_tol must be >= 0, got {self.weak_rank_tol!r}")
        self.fit_options()  # validates the fit fields
        if self.alpha_ci != 0 and self.alpha_ci < 2:
            raise ValidationError(f"alpha_ci must be 0 (off) or >= 2, got {self.alpha_ci!r}")
        if self.expert_overlap < 0:
            raise ValidationError(
                f"expert_overlap must be >= 0 (0: off), got {self.expert_overlap!r}"
            )
        if self.alpha_ci and (self.fit != "PL" or self.xmax == "force"):
            raise ValidationError(
                "alpha_ci bootstraps the power law's closed-form exponent; it does not combine "
                f"with fit={self.fit!r}, xmax={self.xmax!r}: drop one of them"
            )
        if not 0.0 < self.ci_level < 1.0:
            raise ValidationError(f"ci_level must be in (0, 1), got {self.ci_level!r}")
        for name in ("min_evals", "max_evals", "max_n"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValidationError(f"{name} must be >= 1 (or None for no limit), got {value!r}")

    def fit_options(self) -> FitOptions:
        """The power-law fit options of these options."""
        return FitOptions(
            xmax=self.xmax,
            fix_fingers=self.fix_fingers,
            xmin_max=self.xmin_max,
            max_fingers=self.max_fingers,
            finger_thresh=self.finger_thresh,
            ww_compat=self.ww_quirks,
            fit=self.fit,
            fit_entropy=self.fit_entropy,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("include", "exclude", "roles"):
            d[name] = list(d[name])
        return d


@dataclass(frozen=True)
class _Run:
    """What every matrix of one analyze() call shares besides its options."""

    options: AnalyzeOptions
    cache: CacheSpec
    progress: Progress | None
    max_memory: int | None


def analyze(
    source: Source = None,
    options: AnalyzeOptions | None = None,
    *,
    cache: CacheSpec = True,
    progress: Progress | None = None,
    max_memory: int | None = None,
    threads: int | None = None,
    timeout_s: float | None = None,
    hub: HubOptions | None = None,
) -> Analysis | None:
    """HT-SR analysis of the weight matrices of `source` (docs/methods.md section 2).

    source: a `.safetensors` file, a sharded folder, a Hub repo id (`org/name[@revision]`), an
        open `Checkpoint` (left open), or None for the bundled all-MiniLM-L6-v2.
    options: what to compute (AnalyzeOptions; default every matrix, outlier ratio on).
    cache: True (default spectrum cache), False/None (no cache), a folder or a SpectrumCache.
    progress: passed to the engine: progress(done, total, bytes_read) per matrix.
    max_memory: working-memory budget in bytes for one engine batch (None: engine default).
    threads: per-process intra-op threads (or $SPECTRA_NUM_THREADS); the same count gives
        bit-comparable runs (reproducibility contract, docs/architecture.md).
    timeout_s: under torchrun, how long a rank waits for the others (default one hour).
    hub: how a Hub repo id is opened (HubOptions: revision, disk_budget, local_only), in one
        process and under torchrun alike.

    Returns the Analysis; under torchrun on rank 0 only, None on the other ranks.

    >>> an = analyze(options=AnalyzeOptions(roles=("q",)))  # doctest: +SKIP
    >>> [round(lm.alpha, 2) for lm in an.layers][:2]  # doctest: +SKIP
    """
    if source is not None and not isinstance(source, Checkpoint):
        check_source(source, "source")
    check_instance(options, AnalyzeOptions, "options")
    check_value(cache, CacheSpec, "cache")
    check_value(progress, Progress | None, "progress")
    check_instance(hub, HubOptions, "hub")
    run = _Run(AnalyzeOptions() if options is None else options, cache, progress, max_memory)
    if not is_distributed():
        apply_threads(threads)
        with _open_here(source, hub) as ckpt:
            matrices, skipped = size_filter(select_matrices(ckpt, run.options), run.options)
            layers, esds = _analyze_matrices(
                ckpt, matrices, resolve_device(run.options.device), run
            )
            return _analysis(ckpt, run.options, layers, esds, skipped)
    with distributed_session(device=run.options.device, threads=threads, timeout_s=timeout_s) as s:
        with _open_on_ranks(s, source, hub) as ckpt:
            return _analyze_split(s, ckpt, run)


def select_matrices(ckpt: Checkpoint, options: AnalyzeOptions) -> list[MatrixRef]:
    """The matrices `options` select, in checkpoint order (ValidationError when none, or when
    the checkpoint is a LoRA adapter: its factors are not weight matrices)."""
    factors = [t.name for t in ckpt.tensors() if is_adapter_tensor(t.name)]
    if factors:
        raise ValidationError(
            f"{ckpt.source} holds PEFT LoRA factors ({len(factors)} tensors like "
            f"{clip(factors[0])}), not weight matrices: a power law of lora_A or lora_B alone "
            "says nothing about the fine-tune. Compare the adapter with its base "
            "(spectra compare BASE ADAPTER), or merge it first (PEFT merge_and_unload)"
        )
    matrices = ckpt.matrices(include=options.include, exclude=options.exclude, roles=options.roles)
    if not matrices:
        raise ValidationError(
            f"no weight matrices in {ckpt.source} match include={list(options.include)} "
            f"exclude={list(options.exclude)} roles={list(options.roles)}: "
            "loosen the filters (spectra inspect lists the matrices)"
        )
    return matrices


def size_filter(
    matrices: Sequence[MatrixRef], options: AnalyzeOptions
) -> tuple[list[MatrixRef], list[SkippedMatrix]]:
    """Split `matrices` by the size filters (WeightWatcher's min_evals, max_evals, max_N on
    M = min(m, n) and N = max(m, n)) into (kept, skipped with the reason). ValidationError
    when every matrix is filtered out."""
    kept: list[MatrixRef] = []
    skipped: list[SkippedMatrix] = []
    for ref in matrices:
        reason = _size_reason(tuple(ref.shape), options)
        if reason:
            skipped.append(SkippedMatrix(ref.key, tuple(ref.shape), reason))
        else:
            kept.append(ref)
    if not kept:
        raise ValidationError(
            f"the size filters min_evals={options.min_evals} max_evals={options.max_evals} "
            f"max_n={options.max_n} leave none of the {len(skipped)} selected matrices "
            f"(first: {clip(skipped[0].key)} {skipped[0].reason}): loosen them"
        )
    return kept, skipped


def _size_reason(shape: tuple[int, ...], options: AnalyzeOptions) -> str:
    big_m, big_n = min(shape), max(shape)
    if options.min_evals is not None and big_m < options.min_evals:
        return f"min(m, n) = {big_m} < min_evals = {options.min_evals}"
    if options.max_evals is not None and big_m > options.max_evals:
        return f"min(m, n) = {big_m} > max_evals = {options.max_evals}"
    if options.max_n is not None and big_n > options.max_n:
        return f"max(m, n) = {big_n} > max_n = {options.max_n}"
    return ""


def _open_here(source: Source, hub: HubOptions | None) -> AbstractContextManager[Checkpoint]:
    if isinstance(source, Checkpoint):
        return nullcontext(source)
    hub = hub or HubOptions()
    return Checkpoint.open(
        str(bundled_model_path() if source is None else source),
        revision=hub.revision,
        local_only=hub.local_only,
        disk_budget=hub.disk_budget,
    )


def _open_on_ranks(
    session: Session, source: Source, hub: HubOptions | None
) -> AbstractContextManager[Checkpoint]:
    if isinstance(source, Checkpoint):
        return nullcontext(source)
    return open_checkpoint(session, source, hub)


def _analysis(
    ckpt: Checkpoint,
    options: AnalyzeOptions,
    layers: list[LayerMetrics],
    esds: dict[str, np.ndarray],
    skipped: list[SkippedMatrix],
) -> Analysis:
    moe = moe_summary(layers)
    if moe is not None and options.expert_overlap:
        moe = moe.with_overlaps(_expert_overlaps(ckpt, moe, options))
    return Analysis(
        source=str(ckpt.source),
        layers=layers,
        summary=model_summary(layers),
        options=options.to_dict(),
        esds=esds,
        versions=runtime_versions(),
        skipped=skipped,
        commit=getattr(ckpt, "commit", None),
        moe=moe,
    )


def _expert_overlaps(
    ckpt: Checkpoint, moe: MoeSummary, options: AnalyzeOptions
) -> dict[tuple[int | None, str | None], ExpertOverlap]:
    """The expert similarity of every group of >= 2 routed experts of one shape: each expert
    read again, one at a time (only its top-k basis is kept), on the analysis device."""
    device = resolve_device(options.device)
    refs = {ref.key: ref for ref in ckpt.matrices()}
    out: dict[tuple[int | None, str | None], ExpertOverlap] = {}
    for group in moe.groups:
        members = [refs[key] for key in group.keys if key in refs]
        shapes = {tuple(ref.shape) for ref in members}
        if len(members) < 2 or len(shapes) != 1:
            continue
        side = width_side(group.expert_role)
        (shape,) = shapes
        k = effective_k(options.expert_overlap, shape[1] if side == "in" else shape[0])
        bases = [
            top_basis(ckpt.read(ref, device=str(device)), side, k, seed=options.seed)
            for ref in members
        ]
        out[(group.layer, group.expert_role)] = expert_overlap(
            group.layer, group.expert_role, [ref.expert or 0 for ref in members], bases
        )
    return out


# ------------------------------------------------------------------ the per-matrix pipeline


def _analyze_matrices(
    ckpt: Checkpoint, matrices: Sequence[MatrixRef], device: torch.device, run: _Run
) -> tuple[list[LayerMetrics], dict[str, np.ndarray]]:
    """LayerMetrics of `matrices` (in their order) and the ESD of each with a spectrum."""
    options = run.options
    engine = EngineOptions(device=device, max_memory=run.max_memory)
    by_key = {ref.key: ref for ref in matrices}
    base: dict[str, LayerMetrics] = {}
    esds: dict[str, np.ndarray] = {}

    def fit(spec: Spectrum) -> tuple[str, LayerMetrics, np.ndarray | None]:
        layer = _with_extras(_layer(by_key[spec.key], spec, options), spec, options)
        esd = spec.values.double().square().cpu().numpy() if spec.ok else None
        return spec.key, layer, esd

    results = compute_spectra(
        ckpt,
        matrices,
        engine=engine,
        cache=resolve_cache(run.cache),
        progress=run.progress,
        extras=_extras(options),
        then=fit if FITS_ON_WORKER else None,
    )
    # the fits of one batch run on the engine's worker while it decomposes the next; only the
    # eigenvalues, not the Spectrums, are kept
    for item in results:
        key, layer, esd = item if FITS_ON_WORKER else fit(item)
        base[key] = layer
        if esd is not None:
            esds[key] = esd
    rand = _randomized(ckpt, matrices, esds, options, engine)
    layers = [
        replace(base[ref.key], **rand[ref.key]) if ref.key in rand else base[ref.key]
        for ref in matrices
    ]
    return layers, esds


def _layer(ref: MatrixRef, spec: Spectrum | None, options: AnalyzeOptions) -> LayerMetrics:
    """Metrics of one matrix from its Spectrum (weight-based extras are added later)."""
    meta = MatrixMeta(
        key=ref.key, name=ref.tensor.name, role=ref.role, layer=ref.layer, dtype=ref.storage
    )  # storage: the dtype, or how a quantized matrix is stored ("gptq 4-bit group 128")
    shape = tuple(ref.shape)
    if spec is None or not spec.ok:
        message = "no spectrum returned" if spec is None else (spec.message or "spectrum failed")
        method = "" if spec is None else spec.method
        return failed_layer(meta, shape, message, spectrum_method=method)
    S = spec.values.double().cpu().numpy()
    mp = MP_METHODS[options.mp_method](S**2, shape) if options.mp_fit else None
    layer = layer_metrics(
        S, shape, meta, spectrum_method=spec.method, mp=mp, fit_options=options.fit_options()
    )
    if options.weak_rank_tol != WEAK_RANK_TOL and layer.weak_rank_loss is not None:
        layer = replace(layer, weak_rank_loss=weak_rank_loss(S**2, options.weak_rank_tol))
    return replace(layer, **_esd_extras(S**2, layer, options))


def _esd_extras(evals: np.ndarray, layer: LayerMetrics, options: AnalyzeOptions) -> dict:
    """detX, the bootstrap interval of alpha and best_fit, when asked (pure functions of the
    ESD and the fit)."""
    out: dict[str, Any] = {}
    if options.best_fit and layer.xmin is not None and layer.xmax is not None:
        # imported here: it needs scipy (0.4-0.7 s of CPU), which a default report never loads
        from spectra.analysis.best_fit import best_fit

        chosen = best_fit(evals[(evals >= layer.xmin) & (evals <= layer.xmax)])
        out["best_fit"] = None if chosen is None else chosen.best
    if options.detx:
        detx = detx_constraint(evals)
        out["detX_num"] = None if detx is None else detx.num
        out["detX_val"] = None if detx is None else detx.value
    if options.alpha_ci and layer.xmin is not None and layer.xmax is not None:
        ci = bootstrap_alpha(
            evals,
            layer.xmin,
            layer.xmax,
            resamples=options.alpha_ci,
            level=options.ci_level,
            seed=options.seed,
        )
        if ci is not None:
            out["alpha_ci_low"], out["alpha_ci_high"] = ci
    return out


def outlier_key(multiplier: float) -> str:
    """The `Spectrum.extras` (and cache metadata) key of the outlier ratio at `multiplier`."""
    return f"outlier_ratio@{float(multiplier)!r}"


def _with_extras(layer: LayerMetrics, spec: Spectrum, options: AnalyzeOptions) -> LayerMetrics:
    """`layer` with the values the engine hooks computed on the spectrum pass's read."""
    if options.outliers:
        ratio = spec.extras.get(outlier_key(options.outlier_multiplier))
        layer = replace(layer, outlier_ratio=ratio)
    if options.traps and spec.ok:
        found = spec.extras.get(trap_key(options))
        if found is not None:
            layer = replace(layer, num_traps=found[0], traps=tuple(found[1]))
    if options.vectors and spec.ok:
        keys = vector_keys(options)
        layer = replace(layer, **{col: spec.extras.get(keys[col]) for col in keys})
    return layer


def vector_keys(options: AnalyzeOptions) -> dict[str, str]:
    """The `Spectrum.extras` (and cache) key of each vector-localization column: it names the
    fit options, since the bulk/tail split uses the fit's xmin."""
    tag = repr(options.fit_options())
    return {col: f"vectors:{col}@{tag}" for col in VECTOR_COLUMNS}


def _extras(options: AnalyzeOptions) -> MatrixExtras | None:
    """The engine hooks asked for (outlier ratio, vector localization), as one."""
    hooks = [
        h
        for h in (
            _outlier_extras(options) if options.outliers else None,
            _vector_extras(options) if options.vectors else None,
            _trap_extras(options) if options.traps else None,
        )
        if h
    ]
    if not hooks:
        return None
    if len(hooks) == 1:
        return hooks[0]

    def compute(ref: MatrixRef, W: torch.Tensor) -> dict[str, Any]:
        return {k: v for hook in hooks for k, v in hook.compute(ref, W).items()}

    return MatrixExtras(tuple(n for hook in hooks for n in hook.names), compute)


def trap_key(options: AnalyzeOptions) -> str:
    """The `Spectrum.extras` (and cache) key of the traps: [count, [trap dicts]]."""
    return f"traps@seed={options.seed},mp={options.mp_method}"


def _trap_extras(options: AnalyzeOptions) -> MatrixExtras:
    """The engine hook that finds each matrix's correlation traps as it is read."""
    key, fit, seed = trap_key(options), MP_METHODS[options.mp_method], options.seed

    def compute(ref: MatrixRef, W: torch.Tensor) -> dict[str, Any]:
        if not bool(torch.isfinite(W).all()):
            return {key: None}
        count, found = find_traps(W, fit, seed=seed)
        return {key: [count, [t.to_dict() for t in found]]}

    return MatrixExtras((key,), compute)


def _vector_extras(options: AnalyzeOptions) -> MatrixExtras:
    """The engine hook that computes the vector localization of each matrix as it is read:
    its float64 Gram eigenvectors, the fit's xmin on the same eigenvalues, the bulk/tail
    statistics (analysis.vectors)."""
    keys, fit_options = vector_keys(options), options.fit_options()

    def compute(ref: MatrixRef, W: torch.Tensor) -> dict[str, Any]:
        evals, vecs = gram_eigvectors(W)
        if not np.all(np.isfinite(evals)):
            return dict.fromkeys(keys.values())
        xmin = fit_tail(evals, fit_options).fit.xmin
        values = localization(evals, vecs, xmin)
        return {keys[col]: values[col] for col in keys}

    return MatrixExtras(tuple(keys.values()), compute)


def _outlier_extras(options: AnalyzeOptions) -> MatrixExtras:
    """The engine hook that computes the outlier ratio of each matrix as it is read."""
    key, multiplier = outlier_key(options.outlier_multiplier), options.outlier_multiplier

    def compute(ref: MatrixRef, W: torch.Tensor) -> dict[str, float | None]:
        return {key: outlier_ratio(W, multiplier=multiplier)}

    return MatrixExtras((key,), compute)


def _randomized(
    ckpt: Checkpoint,
    matrices: Sequence[MatrixRef],
    esds: dict[str, np.ndarray],
    options: AnalyzeOptions,
    engine: EngineOptions,
) -> dict[str, dict[str, Any]]:
    """The randomized columns per matrix with a spectrum (empty unless `options.randomize`):
    rand_distance, rand_num_spikes (the MP fit of `options.mp_method` on the shuffled ESD) and
    ww_softrank (largest shuffled eigenvalue / largest eigenvalue). The engine decomposes a
    ShuffledView of the checkpoint (same batching and memory budget as the real spectra, no
    cache)."""
    if not options.randomize:
        return {}
    out: dict[str, dict[str, Any]] = {}
    view = ShuffledView(ckpt, seed=options.seed)
    by_key = {ref.key: ref for ref in matrices}
    targets = [ref for ref in matrices if ref.key in esds]
    for spec in compute_spectra(view, targets, engine=engine, cache=None):
        if spec.ok:
            shuffled = spec.values.double().square().cpu().numpy()
            own = esds[spec.key]
            mp = MP_METHODS[options.mp_method](shuffled, tuple(by_key[spec.key].shape))
            top = float(np.max(own)) if own.size else 0.0
            out[spec.key] = {
                "rand_distance": esd_distance(own, shuffled),
                "rand_num_spikes": None if mp is None else mp.num_spikes,
                "ww_softrank": float(np.max(shuffled)) / top if top > 0 else None,
            }
    return out


# ------------------------------------------------------------------ the torchrun split


def _analyze_split(session: Session, ckpt: Checkpoint, run: _Run) -> Analysis | None:
    """Each rank analyzes its share; rank 0 assembles the Analysis (see the module docstring)."""
    # the same list, and errors, on every rank
    matrices, skipped = size_filter(select_matrices(ckpt, run.options), run.options)
    env = session.env
    mine = shard_items(matrices, env.rank, env.world_size)
    share = [matrices[i] for i in mine]

    def work(tracker: Tracker) -> list[tuple[int, tuple[LayerMetrics, np.ndarray | None]]]:
        if not share:
            return []
        layers, esds = _analyze_matrices(
            ckpt, share, session.device, replace(run, progress=_tracked(share, tracker, run))
        )
        return [(i, (lm, esds.get(lm.key))) for i, lm in zip(mine, layers, strict=True)]

    status, part = guarded(session, work)
    settle(session, status)
    merged = gather_results(session, part or [], len(matrices))
    if merged is None:
        return None
    layers = [lm for lm, _ in merged]
    esds = {lm.key: esd for lm, esd in merged if esd is not None}
    return _analysis(ckpt, run.options, layers, esds, skipped)


def _tracked(share: Sequence[MatrixRef], tracker: Tracker, run: _Run) -> Progress:
    """The engine's progress callback on a rank: names the next matrix to the failure tracker
    (so a failure names its matrix, and a failed peer stops this rank), then reports on."""
    keys = [ref.key for ref in share]
    tracker.step(keys[0])

    def tick(done: int, total: int, bytes_read: int) -> None:
        if done < len(keys):
            tracker.step(keys[done])
        if run.progress is not None:
            run.progress(done, total, bytes_read)

    return tick
