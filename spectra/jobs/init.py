"""``init``: a checkpoint in, a PEFT adapter (+ residual base, + manifest) out; one process or
torchrun.

Output folder (written to a temporary sibling, renamed into place when complete):
``adapter/`` (PEFT LoRA adapter), ``residual_base/`` (only for methods that change the base: the
complete checkpoint, sharded like the source, with config and tokenizer files) and
``spectra.json`` (manifest). Load with::

    base = AutoModel.from_pretrained(out / "residual_base")
    model = PeftModel.from_pretrained(base, out / "adapter", is_trainable=True)

Memory: one weight matrix at a time (plus the adapter factors); the residual base is streamed
tensor by tensor (spectra.export.residual).

Reading order:

1. what to do: `InitOptions` (validated when built) and, for CorDA/EVA, `CalibrationRequest`;
2. `init_adapter`: refuse a taken output folder before any work, open the checkpoint, `_plan`
   (targets; ranks explicit, allocated or uniform; then `_calibrate` for a method that needs
   statistics, which may move ranks and set alphas: EVA), then `_write` (each planned matrix
   through `_Runner`: factors, rounding to the adapter dtype, residual, error; the files);
3. `run_init`: the same under torchrun. Weight-only methods split the factorizations over the
   ranks (`_distributed_init`); calibration methods run on rank 0 alone.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spectra.adapt.allocate import Allocation
from spectra.adapt.calib_collect import CalibrationOptions
from spectra.adapt.calib_data import load_texts
from spectra.adapt.calibrate import align_saved, method_ranks, method_statistics
from spectra.adapt.eva import DEFAULT_RHO, DEFAULT_TAU, eva_alphas
from spectra.adapt.expert_targets import (
    ExpertSlot,
    expert_slots,
    plan_experts,
    stack_shapes,
    stacked_parameters,
)
from spectra.adapt.factorize import as_stored, reconstruction_error, residual
from spectra.adapt.plan import (
    AdapterPlan,
    build_plan,
    factor_matrix,
    keyed_by_weight,
    select_targets,
)
from spectra.adapt.ranks import AllocationOptions, allocated_ranks
from spectra.adapt.registry import (
    SVD_MODES,
    Factors,
    Initializer,
    check_factors,
    get_initializer,
)
from spectra.adapt.stats import CalibrationStats, load_stats, save_stats
from spectra.device import resolve_device
from spectra.distributed.failures import RERUN, Tracker, guarded, settle
from spectra.distributed.gather import all_gather, gather_results
from spectra.distributed.hub import open_checkpoint
from spectra.distributed.partition import matrix_cost, matrix_shard, shard_items
from spectra.distributed.runtime import (
    Session,
    apply_threads,
    detect_env,
    distributed_session,
    rank_device,
)
from spectra.errors import ValidationError
from spectra.export.decoded import DequantizedBaseWarning, decoded_dtype, write_decoded_checkpoint
from spectra.export.manifest import build_manifest, write_manifest
from spectra.export.residual import (
    HALF_DTYPES,
    ResidualPrecisionWarning,
    is_side_file,
    residual_storage,
    storage_dtype,
    write_residual_checkpoint,
)
from spectra.fields import check_fields, check_instance
from spectra.formats.files import check_source
from spectra.formats.peft import AdapterContent, write_peft_adapter
from spectra.formats.safetensors import torch_dtypes_by_name
from spectra.outdir import atomic_output_dir, check_output_dir
from spectra.sources.checkpoint import Checkpoint
from spectra.sources.hub_options import HubOptions
from spectra.sources.roles import MatrixRef

Progress = Callable[[int, int, str], None]
ADAPTER_DIR = "adapter"
RESIDUAL_DIR = "residual_base"
STORAGE_DTYPES = torch_dtypes_by_name(("F32", "BF16", "F16"))
BUILTIN_CORPUS = "built-in corpus (spectra/adapt/data/default_corpus.txt)"
RESIDUAL_DTYPE_CHOICES = ("source", "float32")


def storage_dtype_of(name: str) -> torch.dtype:
    """The adapter storage dtype called ``name`` (float32, bfloat16, float16)."""
    found = STORAGE_DTYPES.get(name)
    if found is None:
        raise ValidationError(f"adapter dtype {name!r} is not one of {', '.join(STORAGE_DTYPES)}")
    return found


# ----------------------------------------------------------------------------- what to do


@dataclass(frozen=True)
class InitOptions:
    """What `init_adapter` does; checked when built (no file touched).

    out: output folder; method: a registered initializer (pissa, milora, olora, corda-ipm,
    corda-kpm, eva, lamda++); rank: uniform rank, or the mean rank when ``allocator`` is given
    without ``budget``; targets: comma list or sequence of roles, module paths or suffixes, globs,
    ``re:<regex>`` (spectra.adapt.plan); allocator / budget / budget_unit / min_rank / max_rank:
    see spectra.adapt.allocate (a method with a ``default_allocator``, lamda++, uses it when
    neither ``allocator`` nor ``ranks`` is given); alpha: LoRA alpha for every module (None:
    alpha = r per module); rslora: scale alpha/sqrt(r); svd: "auto", "exact" (CLI ``--exact``) or
    "randomized"; device: "auto", "cpu", "cuda[:N]", "mps"; dtype: storage dtype of the adapter
    (the factors are rounded to it before the residual is computed, so the residual absorbs that
    rounding); seed: of randomized SVDs; ranks: explicit rank per target (weight name or module
    path; 0 = no adapter there), instead of rank/allocator; alphas: explicit alpha per target
    (same keys), over ``alpha``; force: replace a non-empty ``out``; residual_dtype: "source"
    (the residual base keeps the source's dtypes; a float16/bfloat16 one is then warned about
    with its measured reconstruction error) or "float32" (float16/bfloat16 tensors of the
    residual base are stored as float32: reconstruction error at float32 level); hub: how a
    Hub repo id is opened (HubOptions: revision, disk_budget to stream it, local_only).
    """

    out: str | Path
    method: str = "pissa"
    rank: int = 16
    targets: str | Sequence[str] = "q,k,v,o,up,gate,down"
    allocator: str | None = None
    budget: int | None = None
    budget_unit: str = "rank"
    min_rank: int = 1
    max_rank: int | None = None
    alpha: float | None = None
    rslora: bool = False
    svd: str = "auto"
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    ranks: Mapping[str, int] | None = None
    alphas: Mapping[str, float] | None = None
    force: bool = False
    residual_dtype: str = "source"
    hub: HubOptions | None = None

    def __post_init__(self) -> None:
        if isinstance(self.device, torch.device):
            object.__setattr__(self, "device", str(self.device))
        check_fields(self)  # rank="8", targets=None, ...: ValidationError naming the field
        get_initializer(self.method)  # an unknown method: the error lists the registered ones
        storage_dtype_of(self.dtype)
        if self.residual_dtype not in RESIDUAL_DTYPE_CHOICES:
            raise ValidationError(
                f"residual dtype {str(self.residual_dtype)[:40]!r} is not one of "
                f"{', '.join(RESIDUAL_DTYPE_CHOICES)}"
            )
        if self.rank < 1:
            raise ValidationError(f"rank must be >= 1, got {self.rank}")
        if self.svd not in SVD_MODES:
            raise ValidationError(f"svd mode {self.svd!r} is not one of {', '.join(SVD_MODES)}")

    def allocation(self, allocator: str | None) -> AllocationOptions:
        """The allocation part of these options, with ``allocator`` (the method's default when
        none was named)."""
        return AllocationOptions(
            allocator, self.rank, self.budget, self.budget_unit, self.min_rank, self.max_rank
        )


@dataclass(frozen=True)
class CalibrationRequest:
    """Where calibration data comes from and how it is used (CLI: ``spectra init --calib ...``).

    calib: text file (one sample per line) or JSONL file; None: the built-in corpus.
    text_field: the JSONL field with the text. samples / max_length / batch_size / max_batches /
    tau: see spectra.adapt.calib_collect.CalibrationOptions (tau and max_batches: EVA only).
    rho: EVA's components per unit of rank (>= 1; 1 = no redistribution). adjust_scaling: EVA's
    ``adjust_scaling_factors`` (spectra.adapt.eva.eva_alphas). stats: reuse saved statistics
    instead of forward passes. stats_out: save the statistics there. progress: ``(done, total)``
    batches.
    """

    calib: str | Path | None = None
    text_field: str = "text"
    samples: int | None = 128
    max_length: int = 128
    batch_size: int = 8
    max_batches: int | None = None
    tau: float = DEFAULT_TAU
    rho: float = DEFAULT_RHO
    adjust_scaling: bool = True
    stats: str | Path | None = None
    stats_out: str | Path | None = None
    progress: Callable[[int, int], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_fields(self)
        self.options()  # validates samples, max_length, batch_size, max_batches, tau
        if not self.rho >= 1.0:
            raise ValidationError(
                f"rho must be >= 1 (1 keeps the ranks as they are), got {self.rho}"
            )
        if self.stats is not None and self.calib is not None:
            raise ValidationError("give --calib (compute statistics) or --stats (reuse), not both")

    def options(self) -> CalibrationOptions:
        """Forward-pass options (what to collect is set per method by method_statistics)."""
        return CalibrationOptions(
            samples=self.samples,
            max_length=self.max_length,
            batch_size=self.batch_size,
            covariance=True,
            tau=self.tau,
            max_batches=self.max_batches,
        )


@dataclass(frozen=True)
class InitResult:
    """Where the outputs are, the plan that was followed and the per-matrix reconstruction
    error (relative Frobenius, after the residual's cast to its storage dtype)."""

    out: Path
    adapter_dir: Path
    residual_dir: Path | None
    manifest_path: Path
    plan: AdapterPlan
    errors: dict[str, float]
    seconds: float
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "adapter_dir": str(self.adapter_dir),
            "residual_dir": None if self.residual_dir is None else str(self.residual_dir),
            "manifest_path": str(self.manifest_path),
            "plan": self.plan.to_dict(),
            "errors": dict(self.errors),
            "seconds": self.seconds,
            "calibration": self.calibration,
        }


@dataclass(frozen=True)
class _Job:
    """One run's options, resolved: absolute source path (when local) and output folder, the
    initializer, this process's device, and the statistics or calibration request."""

    source: str
    options: InitOptions
    init: Initializer
    out: Path
    device: torch.device
    stats: Mapping[str, Any] | None
    calibration: CalibrationRequest | None

    @property
    def adapter_dtype(self) -> torch.dtype:
        return storage_dtype_of(self.options.dtype)

    @property
    def upcast(self) -> bool:
        """Whether the residual base stores float16/bfloat16 tensors as float32."""
        return self.options.residual_dtype == "float32"

    @property
    def weights_only(self) -> bool:
        """True when the factors depend on the weights alone (no calibration statistics), so
        any process holding the checkpoint can compute any matrix's factors."""
        return not self.init.needs_calibration and self.stats is None and self.calibration is None

    @property
    def protect(self) -> tuple[str | Path | None, ...]:
        """The run's inputs: never replaced by the output folder, even with ``force``."""
        calib = self.calibration
        files = () if calib is None else (calib.calib, calib.stats, calib.stats_out)
        return (self.source, *files)


def _job(
    source: str | Path,
    options: InitOptions,
    calibration: CalibrationRequest | None,
    stats: Mapping[str, Any] | None,
) -> _Job:
    # A local path is recorded absolute (manifest, base_model_name_or_path), so the outputs
    # still point at the right base when used from another folder (e.g. by `spectra convert`).
    if Path(source).expanduser().exists():
        source = Path(source).expanduser().resolve()
    return _Job(
        source=str(source),
        options=options,
        init=get_initializer(options.method),
        out=Path(options.out).expanduser().absolute(),
        device=resolve_device(options.device),
        stats=stats,
        calibration=calibration,
    )


# ----------------------------------------------------------------------------- one process


def init_adapter(
    source: str | Path,
    options: InitOptions,
    *,
    calibration: CalibrationRequest | None = None,
    stats: Mapping[str, Any] | None = None,
    factors: Mapping[str, Factors] | None = None,
    progress: Progress | None = None,
) -> InitResult:
    """Initialize LoRA adapters on ``options.targets`` of ``source`` and write them (see the
    module docstring for the output folder).

    calibration: how to compute statistics for a method that needs them when ``stats`` is not
    given (None: the built-in corpus with default options); EVA's redistributed ranks and
    adjusted alphas then reach the plan. stats: per-module calibration statistics (module path ->
    statistics), used as given. factors: precomputed ``Factors`` (``A (r, n)``, ``B (m, r)``,
    info) per weight name, e.g. from other processes (`run_init`); they are used instead of
    calling the method for those matrices (checked like the method's own), while residuals and
    errors are computed here from the weights exactly as for computed factors. progress:
    ``(done, total, key)`` after every matrix.

    >>> res = init_adapter("base", InitOptions(out="o", rank=16, targets=["q", "v"]))
    ...                                                   # doctest: +SKIP
    """
    check_source(source, "source")
    check_instance(options, InitOptions, "options", optional=False)
    check_instance(calibration, CalibrationRequest, "calibration")
    started = time.perf_counter()
    job = _job(source, options, calibration, stats)
    # refuse before any reading, SVD or calibration
    check_output_dir(job.out, force=options.force, protect=job.protect)
    hub = options.hub or HubOptions()
    with Checkpoint.open(
        job.source, revision=hub.revision, local_only=hub.local_only, disk_budget=hub.disk_budget
    ) as ckpt:
        planned = _plan(ckpt, job)
        return _write(ckpt, job, planned, factors, progress, started)


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class _Planned:
    """The selected target matrices, the plan, the statistics each module's initializer reads
    (module path -> statistics) and the manifest's calibration record."""

    selected: list[MatrixRef]
    plan: AdapterPlan
    stats: Mapping[str, Any]
    calibration: dict[str, Any] | None = None
    slots: Mapping[str, ExpertSlot] = field(default_factory=dict)  # MoE experts, by key


def _plan(ckpt: Checkpoint, job: _Job) -> _Planned:
    """Targets, ranks (explicit, allocated or uniform; then calibration) and the plan, for the
    open checkpoint. Deterministic for a given checkpoint and job."""
    opts = job.options
    selected = select_targets(ckpt.matrices(), opts.targets)
    slots = _expert_slots(ckpt, job, selected)
    ranks, allocation = _initial_ranks(ckpt, job, selected)
    stats: Mapping[str, Any] = job.stats or {}
    alphas, record = None, None
    if job.init.needs_calibration and not job.stats:
        calibrated = _calibrate(job, selected, ranks or {m.key: opts.rank for m in selected})
        ranks, stats = calibrated.ranks, calibrated.stats
        alphas, record = calibrated.alphas, calibrated.record
    plan = build_plan(
        selected,
        ranks if ranks is not None else {m.key: opts.rank for m in selected},
        method=job.init.name,
        targets=opts.targets,
        alpha=opts.alpha,
        alphas=keyed_by_weight(selected, alphas if opts.alphas is None else opts.alphas, "alphas"),
        rslora=opts.rslora,
        allocation=allocation,
    )
    return _Planned(selected, plan_experts(plan, slots, opts.alpha), stats, record, slots)


def _expert_slots(ckpt: Checkpoint, job: _Job, selected: list[MatrixRef]) -> dict[str, ExpertSlot]:
    """The PEFT parameter slot of each selected routed expert (spectra.adapt.expert_targets);
    one-line refusals for what the expert export cannot do."""
    experts = [m for m in selected if m.role == "expert"]
    if not experts:
        return {}
    if job.init.needs_calibration:
        raise ValidationError(
            f"{job.init.name} on MoE experts ({experts[0].key} ...): calibration collects the "
            "inputs of nn.Linear modules, and transformers holds routed experts as 3-D "
            "parameters: use a weight-only method (pissa, milora, olora) or leave the experts "
            "out of --targets"
        )
    if job.options.alphas is not None:
        named = {k.removesuffix(".weight") for k in job.options.alphas}
        hit = [m.key for m in experts if m.key in named or m.key.removesuffix(".weight") in named]
        if hit:
            raise ValidationError(
                f"alphas name the expert matrix {hit[0]!r}: PEFT gives all experts of one "
                "3-D parameter one alpha; use --alpha"
            )
    stacked = [m for m in experts if m.encoded is not None and "[expert=" in m.key]
    if stacked and job.init.mutates_base:
        raise ValidationError(
            f"{stacked[0].key}: the residual of a quantized 3-D expert stack is not written "
            "yet; leave the experts out of --targets or dequantize the checkpoint first"
        )
    return expert_slots(experts, ckpt.config.get("model_type"))  # type: ignore[arg-type]


def _initial_ranks(
    ckpt: Checkpoint, job: _Job, selected: list[MatrixRef]
) -> tuple[dict[str, int] | None, Allocation | None]:
    """Explicit ranks, or an allocator's (the method's default allocator when none is named),
    or None for the uniform rank."""
    opts = job.options
    if opts.ranks is not None:
        if opts.allocator is not None:
            raise ValidationError("give explicit ranks or an allocator (--allocate), not both")
        return keyed_by_weight(selected, opts.ranks, "ranks"), None
    allocator = opts.allocator
    if allocator is None:
        allocator = getattr(job.init, "default_allocator", None)
    return allocated_ranks(ckpt, selected, opts.allocation(allocator), job.device)


# ----------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class _Calibrated:
    """stats: module path -> statistics for ``InitContext.stats``; ranks: weight key -> rank
    (0 = no adapter); alphas: weight key -> alpha, or None to keep the plan's rule; record:
    JSON-safe calibration record for the manifest."""

    stats: dict[str, Any]
    ranks: dict[str, int]
    alphas: dict[str, float] | None
    record: dict[str, Any]


def _calibrate(job: _Job, selected: list[MatrixRef], ranks: Mapping[str, int]) -> _Calibrated:
    """The calibration step of a method that needs statistics (CorDA, EVA):

    1. statistics: reuse a file written earlier (``stats``, spectra.adapt.stats.save_stats) or run
       forward passes over the calibration text (``calib``: a text or JSONL file; None: the
       built-in corpus); optionally save them (``stats_out``);
    2. ranks: EVA redistributes the initial ranks (rho; arXiv 2410.07170), CorDA keeps them;
       either way a module calibration has no statistics for (skipped: its input is not
       ``(batch, tokens, features)``, or the transformers model has no such module) gets rank 0,
       so no adapter, and is named in the manifest; no statistics for any target is an error;
    3. alphas (EVA): spectra.adapt.eva.eva_alphas.
    """
    request = job.calibration or CalibrationRequest()
    method = job.init.name
    before = {m.key: int(ranks[m.key]) for m in selected}
    if request.stats is not None:
        paths = [m.key.removesuffix(".weight") for m in selected]
        stats = align_saved(load_stats(request.stats), paths)
    else:
        texts = load_texts(request.calib, samples=request.samples, text_field=request.text_field)
        fresh = method_statistics(
            job.source,
            method,
            before,
            texts,
            request.options(),
            rho=request.rho,
            device=job.device,
            progress=request.progress,
        )
        data = str(request.calib) if request.calib is not None else BUILTIN_CORPUS
        stats = replace(fresh, info={**fresh.info, "data": data})
    after = method_ranks(
        stats,
        method,
        before,
        rho=request.rho,
        max_ranks={m.key: min(int(d) for d in m.shape) for m in selected},
        reused=request.stats is not None,
    )
    if request.stats_out is not None:
        save_stats(request.stats_out, stats)
    alphas = None
    if method == "eva":
        alphas = eva_alphas(
            job.options.alpha,
            before,
            after,
            adjust_scaling=request.adjust_scaling,
            rslora=job.options.rslora,
        )
    by_module = dict.fromkeys((m.key.removesuffix(".weight") for m in selected), stats)
    record = _calibration_record(stats, request, dict(ranks), after, method)
    return _Calibrated(by_module, after, alphas, record)


def _calibration_record(
    stats: CalibrationStats,
    request: CalibrationRequest,
    before: Mapping[str, int],
    after: Mapping[str, int],
    method: str,
) -> dict[str, Any]:
    """The manifest's ``calibration`` record: data, run facts, skipped modules, ranks, and (EVA)
    per-module convergence of the components each adapter uses."""
    info = dict(stats.info)
    record: dict[str, Any] = {
        "data": info.get("data"),
        "stats_file": None if request.stats is None else str(request.stats),
        "stats_out": None if request.stats_out is None else str(request.stats_out),
        "text_field": request.text_field,
        **{k: info.get(k) for k in ("samples", "tokens", "batches", "stop", "max_length")},
        "batch_size": info.get("batch_size"),
        "shared_inputs": dict(stats.shared),
        "skipped": dict(stats.skipped),
        "ranks_before": dict(before),
        "ranks_after": dict(after),
    }
    if method == "eva":
        record.update(
            tau=info.get("tau"),
            max_batches=info.get("max_batches"),
            rho=request.rho,
            adjust_scaling=request.adjust_scaling,
            convergence=_convergence(stats, after),
        )
    return record


def _convergence(stats: CalibrationStats, ranks: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, rank in ranks.items():
        path = key.removesuffix(".weight")
        if rank <= 0 or stats.leader(path) not in stats.svd:
            continue
        state = stats.svd_state(path)
        flags = state.converged[:rank]
        out[path] = {
            "rank": int(rank),
            "converged": bool(flags.all()),
            "converged_components": int(flags.sum()),
            "batches": int(state.batches),
        }
    return out


# ----------------------------------------------------------------------------- write


class _Runner:
    """Initializes one planned matrix at a time (read, factorize with the method through
    `factor_matrix` or take precomputed factors, round the factors to the adapter dtype, residual
    and reconstruction error), keeping only the small factors and facts.

    ``factors`` (weight name -> Factors, any device): precomputed factors used instead of calling
    the method; the weights are still read for the residual and the error."""

    def __init__(
        self,
        ckpt: Checkpoint,
        job: _Job,
        planned: _Planned,
        progress: Progress | None,
        factors: Mapping[str, Factors] | None,
    ) -> None:
        self.ckpt, self.job, self.planned, self.progress = ckpt, job, planned, progress
        self.todo = planned.plan.by_key()
        self.refs = {m.key: m for m in planned.selected}
        self.given = dict(factors or {})
        unknown = sorted(set(self.given) - set(self.todo))
        if unknown:
            raise ValidationError(
                f"precomputed factors for {len(unknown)} matrix(es) outside the plan, e.g. "
                f"{unknown[0]!r}: pass factors keyed by the planned weight names"
            )
        self.stacks: dict[str, list[str]] = {}  # 3-D expert stack name -> planned slice keys
        for key, ref in self.refs.items():
            if key in self.todo and ref.expert is not None and len(ref.tensor.shape) == 3:
                self.stacks.setdefault(ref.tensor.name, []).append(key)
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        self.errors: dict[str, float] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.half: dict[str, str] = {}  # residuals stored in half precision: key -> dtype

    def _factors(self, key: str, W: Tensor) -> Factors:
        mp = self.todo[key]
        given = self.given.get(key)
        if given is None:
            stats = self.planned.stats.get(mp.module)
            opts = self.job.options
            return factor_matrix(self.job.init, W, mp, svd=opts.svd, seed=opts.seed, stats=stats)
        check_factors(given, mp.shape, mp.rank, self.job.init.name)
        return Factors(given.A.to(W.device), given.B.to(W.device), given.info)

    def run(self, key: str) -> Tensor | None:
        """Factors for matrix ``key``; returns its residual in the storage dtype (or None when
        the method leaves the base unchanged)."""
        mp = self.todo[key]
        ref = self.refs[key]
        W = self.ckpt.read(ref, dtype=torch.float32, device=str(self.job.device))
        f = self._factors(key, W)
        # The adapter is stored in the adapter dtype: round A and B to it first, so the residual
        # absorbs that rounding (W_res + s B A == W up to the residual's own storage rounding)
        # and the reported error is the error of what is written.
        A, B = as_stored(f.A, self.job.adapter_dtype), as_stored(f.B, self.job.adapter_dtype)
        W_res = None
        if self.job.init.mutates_base:
            stored = (
                residual_storage(ref.tensor.dtype, upcast=self.job.upcast)
                if ref.encoded is None
                else decoded_dtype(self.ckpt, upcast=self.job.upcast)
            )
            W_res = residual(W, A, B, mp.scale, dtype=storage_dtype(stored))
            if stored in HALF_DTYPES:
                self.half[key] = stored
        self.errors[key] = reconstruction_error(W, W_res, A, B, mp.scale)
        self.info[key] = dict(f.info, rank=mp.rank, error=self.errors[key])
        self.factors[mp.module] = (A.cpu(), B.cpu())
        if self.progress is not None:
            self.progress(len(self.factors), len(self.todo), key)
        return None if W_res is None else W_res.cpu()

    def replace(self, name: str) -> Tensor | None:
        if name in self.stacks:
            return self._stack(name)
        return self.run(name) if name in self.todo else None

    def _stack(self, name: str) -> Tensor | None:
        """A 3-D expert stack with the residual of every planned expert in its slice (read
        as stored: (E, out, in), or (E, in, out) for a transposed stack)."""
        keys = self.stacks[name]
        stack = self.ckpt.read(self.refs[keys[0]].tensor, dtype=torch.float32)
        dtype = None
        for key in keys:
            ref = self.refs[key]
            W_res = self.run(key)
            if W_res is None:
                return None
            dtype = W_res.dtype
            stack[ref.expert] = W_res.float().T if ref.transpose else W_res.float()
        return stack.to(dtype)


def _write(
    ckpt: Checkpoint,
    job: _Job,
    planned: _Planned,
    factors: Mapping[str, Factors] | None,
    progress: Progress | None,
    started: float,
) -> InitResult:
    """Factorize (or take from ``factors``, keyed by weight name), compute residuals and errors,
    and write the output folder atomically; the output folder must have been checked."""
    runner = _Runner(ckpt, job, planned, progress, factors)
    protect = (*job.protect, *ckpt.files)  # re-checked at the swap: no window
    with atomic_output_dir(job.out, force=job.options.force, protect=protect) as tmp:
        base_name = _run_every_matrix(tmp, ckpt, job, runner)
        _write_adapter_and_manifest(tmp, ckpt, job, planned, runner, base_name)
    _warn_half_residual(runner)
    final = job.out
    return InitResult(
        out=final,
        adapter_dir=final / ADAPTER_DIR,
        residual_dir=final / RESIDUAL_DIR if job.init.mutates_base else None,
        manifest_path=final / "spectra.json",
        plan=planned.plan,
        errors=dict(runner.errors),
        seconds=time.perf_counter() - started,
        info=dict(runner.info),
        calibration=planned.calibration,
    )


def _warn_half_residual(runner: _Runner) -> None:
    """One line when residuals were stored in half precision, with the measured error."""
    if not runner.half:
        return
    worst = max(runner.half, key=lambda k: runner.errors[k])
    dtype = {"BF16": "bfloat16", "F16": "float16"}[runner.half[worst]]
    warnings.warn(
        f"the residual base is stored in {dtype} like the source: max reconstruction error "
        f"{runner.errors[worst]:.1e} ({worst}); pass --residual-dtype float32 "
        "(InitOptions(residual_dtype='float32')) for a float32 residual base",
        ResidualPrecisionWarning,
        stacklevel=4,
    )


def _run_every_matrix(tmp: Path, ckpt: Checkpoint, job: _Job, runner: _Runner) -> str:
    """Every planned matrix through ``runner.run`` once, in shard order; returns the base model
    the adapter names. A method that changes the base streams its residual checkpoint tensor by
    tensor: the writer asks the runner for each tensor (``runner.replace``), so one residual is in
    memory at a time. A method that leaves the base unchanged (EVA) runs the plan in order."""
    if job.init.mutates_base:
        # A single-file source's folder is not a checkpoint: take no side files from it.
        folder_source = not Path(job.source).expanduser().is_file()
        if ckpt.quantization.method is not None:
            _write_dequantized_base(tmp, ckpt, job, runner, folder_source)
            return str(job.out / RESIDUAL_DIR)
        if folder_source:  # a streamed Hub repo: its config and tokenizer files, beside
            ckpt.fetch_side_files(is_side_file)
        write_residual_checkpoint(
            list(ckpt.files),
            tmp / RESIDUAL_DIR,
            runner.replace,
            copy_files=folder_source,
            upcast=job.upcast,
            opener=ckpt.open_shard,
        )
        return str(job.out / RESIDUAL_DIR)
    for key in runner.todo:
        runner.run(key)
    return job.source


def _write_dequantized_base(
    tmp: Path, ckpt: Checkpoint, job: _Job, runner: _Runner, copy_files: bool
) -> None:
    """A quantized base's residual: every encoded weight written dequantized (the residual for
    the planned ones), with a note saying so (`spectra.export.decoded`)."""
    write_decoded_checkpoint(
        ckpt, tmp / RESIDUAL_DIR, runner.replace, upcast=job.upcast, copy_files=copy_files
    )
    dtype = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[
        decoded_dtype(ckpt, upcast=job.upcast)
    ]
    formats = ", ".join(ckpt.quantization.formats())
    warnings.warn(
        f"the base is quantized ({formats}): residual_base/ holds all "
        f"{len(ckpt.quantization.weights)} quantized weights dequantized to {dtype} (the "
        "planned ones as residuals) and a config.json without quantization_config; load it as "
        "a plain model, or quantize it again yourself",
        DequantizedBaseWarning,
        stacklevel=4,
    )


def _write_adapter_and_manifest(
    tmp: Path,
    ckpt: Checkpoint,
    job: _Job,
    planned: _Planned,
    runner: _Runner,
    base_name: str,
) -> None:
    plan, opts = planned.plan, job.options
    missing = set(runner.todo) - set(runner.errors)
    if missing:
        raise ValidationError(f"targets not found in the shards: {sorted(missing)[:3]}")
    slots = planned.slots
    linear = [m for m in plan.modules if m.key not in slots]
    experts = ckpt.matrices(roles=("expert",))
    every_slot = expert_slots(experts, ckpt.config.get("model_type"), strict=False)  # type: ignore[arg-type]
    stacked = stacked_parameters(plan, slots, runner.factors, stack_shapes(experts, every_slot))
    content = AdapterContent(
        {m.module: runner.factors[m.module] for m in linear},
        {m.module: m.alpha for m in linear},
        rslora=plan.rslora,
        base_model_name_or_path=base_name,
        dtype=job.adapter_dtype,
        parameters=stacked,
    )
    write_peft_adapter(tmp / ADAPTER_DIR, content)
    options: dict[str, Any] = {
        "rank": opts.rank,
        "alpha": opts.alpha,
        "rslora": opts.rslora,
        "svd": opts.svd,
        "device": str(job.device),
        "dtype": opts.dtype,
        "seed": opts.seed,
        "targets": list(plan.targets),
    }
    if opts.residual_dtype != "source":  # recorded when chosen (earlier manifests unchanged)
        options["residual_dtype"] = opts.residual_dtype
    manifest = build_manifest(
        kind="init",
        method=plan.method,
        source=job.source,
        source_files=ckpt.describe_shards(),
        options=options,
        plan=plan.to_dict(),
        matrices=runner.info,
        extra={
            "allocation": None if plan.allocation is None else plan.allocation.to_dict(),
            "ranks": plan.ranks,
            "max_reconstruction_error": max(runner.errors.values()),
            "calibration": planned.calibration,
            **({"source_commit": ckpt.commit} if ckpt.commit else {}),
        },
    )
    write_manifest(tmp, manifest)


# ----------------------------------------------------------------------------- torchrun


def run_init(
    source: str | Path,
    options: InitOptions,
    *,
    calibration: CalibrationRequest | None = None,
    threads: int | None = None,
    timeout_s: float | None = None,
    progress: Progress | None = None,
) -> InitResult | None:
    """`init_adapter` over all torchrun ranks; the InitResult on rank 0, None on the others.
    Outside torchrun (or with one process): `init_adapter` with ``threads`` intra-op threads.

    Weight-only methods (pissa, milora, olora, lamda++) are split (`_distributed_init`), with
    outputs identical to a single-process run. Methods that need calibration statistics (CorDA,
    EVA, or a call with ``calibration``) run on rank 0 alone, on `cuda:LOCAL_RANK` (or the CPU);
    the other ranks return None at once, without joining a process group, so nothing can wait on
    them.
    """
    check_source(source, "source")
    check_instance(options, InitOptions, "options", optional=False)
    env = detect_env()
    mine = replace(options, device=str(rank_device(env, options.device)))
    if not env.is_distributed:
        apply_threads(threads)
        return init_adapter(source, mine, calibration=calibration, progress=progress)
    job = _job(source, mine, calibration, None)  # same on all ranks but the device
    if not job.weights_only:
        if not env.is_writer:
            return None
        apply_threads(threads)
        return init_adapter(source, mine, calibration=calibration, progress=progress)
    with distributed_session(device=options.device, threads=threads, timeout_s=timeout_s) as s:
        return _distributed_init(s, job, progress)


def init_share(
    modules: Sequence[Any], refs: Mapping[str, MatrixRef], rank: int, world_size: int
) -> list[int]:
    """Indices of the planned `modules` (ModulePlan-like: ``.key``) that `rank` factorizes.

    refs: the checkpoint's MatrixRefs by key (shape, bytes, shard). Shard-affine and balanced by
    `matrix_cost` (the full-spectrum estimate: an upper bound for top-r methods whose ratio
    between matrices of one model is close to the true one).
    """
    items = [refs[mp.key] for mp in modules]
    return shard_items(items, rank, world_size, cost=matrix_cost, group=matrix_shard)


def _distributed_init(session: Session, job: _Job, progress: Progress | None) -> InitResult | None:
    """The torchrun split of a weight-only init, in four stages (each ends in `settle`, so a
    failure on any rank stops every rank with one `DistributedError` naming the rank, the matrix
    and the error, instead of a hang):

    1. refuse: rank 0 checks the output folder before anything is read, so a refusal reaches the
       other ranks before they compute in vain;
    2. plan: every rank opens the checkpoint (Hub shards once per node); rank 0 plans (`_plan`:
       an allocator's spectra are computed once, on rank 0) and sends the planned modules to
       every rank;
    3. factorize: each rank computes the method's factors (`factor_matrix`, the same call a
       single process makes) for its share (`init_share`) on its own device; the factors (small:
       ``r (m + n)`` numbers per matrix) travel to rank 0 as CPU tensors;
    4. write: rank 0 runs `_write` with the gathered factors: it reads every target once more for
       the residual base and the reconstruction errors, exactly as a single process does, so the
       outputs are the single-process outputs bit for bit (same seed, thread count and device
       type; docs/scaling.md). The other ranks return None and write nothing.
    """
    started = time.perf_counter()

    def refuse(tracker: Tracker) -> None:
        if session.is_writer:
            check_output_dir(job.out, force=job.options.force, protect=job.protect)

    status, _ = guarded(session, refuse)
    settle(session, status, RERUN)
    with open_checkpoint(session, job.source, job.options.hub) as ckpt:

        def plan(tracker: Tracker) -> _Planned | None:
            return _plan(ckpt, job) if session.is_writer else None

        status, planned = guarded(session, plan)
        settle(session, status, RERUN)
        modules = all_gather(session, None if planned is None else planned.plan.modules)[0]
        refs = {m.key: m for m in ckpt.matrices()}
        env = session.env
        share = [(i, modules[i]) for i in init_share(modules, refs, env.rank, env.world_size)]

        def work(tracker: Tracker) -> list[tuple[int, Factors]]:
            return _factor_share(tracker, ckpt, job, share, refs, progress)

        status, part = guarded(session, work)
        settle(session, status, RERUN)
        gathered = gather_results(session, part or [], len(modules))
        if gathered is None or planned is None:
            return None
        factors = {mp.key: f for mp, f in zip(modules, gathered, strict=True)}
        return _write(ckpt, job, planned, factors, progress, started)


def _factor_share(
    tracker: Tracker,
    ckpt: Checkpoint,
    job: _Job,
    share: Sequence[tuple[int, Any]],
    refs: Mapping[str, MatrixRef],
    progress: Progress | None,
) -> list[tuple[int, Factors]]:
    """``(index, Factors)`` for this rank's planned modules, factors moved to the CPU."""
    out = []
    for done, (i, mp) in enumerate(share):
        tracker.step(mp.key)
        W = ckpt.read(refs[mp.key], dtype=torch.float32, device=str(job.device))
        f = factor_matrix(job.init, W, mp, svd=job.options.svd, seed=job.options.seed)
        out.append((i, Factors(f.A.cpu(), f.B.cpu(), dict(f.info))))
        if progress is not None:
            progress(done + 1, len(share), mp.key)
    return out
