"""``init_adapter``: a checkpoint in, a PEFT adapter (+ residual base, + manifest) out.

Output folder (written to a temporary sibling, renamed into place when complete):
``adapter/`` (PEFT LoRA adapter), ``residual_base/`` (only for methods that change the base: the
complete checkpoint, sharded like the source, with config and tokenizer files) and
``spectra.json`` (manifest). Load with::

    base = AutoModel.from_pretrained(out / "residual_base")
    model = PeftModel.from_pretrained(base, out / "adapter", is_trainable=True)

Memory: one weight matrix at a time (plus the adapter factors); the residual base is streamed
tensor by tensor (spectra.export.residual).

Stages (for callers that split the work, spectra.distributed.init): `init_job` checks the
arguments, `plan_init` resolves targets and ranks on an open checkpoint, `write_init` factorizes
(or takes precomputed factors) and writes; ``init_adapter`` is the three in a row.

Layering note: this module sits at the end of ``adapt`` and drives ``export``'s writers; with
init_write.py it is the one place in ``adapt`` that imports ``export`` (lazily, inside the
functions). Which ranks: spectra.adapt.init_ranks; the per-matrix work and the files:
spectra.adapt.init_write.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spectra.adapt.init_ranks import _Choice, _choose_ranks, _explicit, _ranks, module_stats
from spectra.adapt.init_write import (
    ADAPTER_DIR,
    RESIDUAL_DIR,
    Progress,
    _Runner,
    _write_outputs,
    as_stored,
)
from spectra.adapt.plan import AdapterPlan, build_plan, select_targets
from spectra.adapt.registry import Factors, Initializer, get_initializer
from spectra.device import resolve_device
from spectra.errors import ValidationError
from spectra.formats.safetensors import torch_dtypes_by_name

if TYPE_CHECKING:
    from spectra.adapt.calib_step import CalibrationRequest

__all__ = [
    "ADAPTER_DIR",
    "RESIDUAL_DIR",
    "STORAGE_DTYPES",
    "InitJob",
    "InitResult",
    "PlannedInit",
    "Progress",
    "_Choice",
    "_Runner",
    "_choose_ranks",
    "_explicit",
    "_ranks",
    "_write_outputs",
    "as_stored",
    "init_adapter",
    "init_job",
    "module_stats",
    "plan_init",
    "storage_dtype_of",
    "write_init",
]

STORAGE_DTYPES = torch_dtypes_by_name(("F32", "BF16", "F16"))


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


def storage_dtype_of(name: str) -> torch.dtype:
    found = STORAGE_DTYPES.get(name)
    if found is None:
        raise ValidationError(f"adapter dtype {name!r} is not one of {', '.join(STORAGE_DTYPES)}")
    return found


@dataclass(frozen=True)
class InitJob:
    """``init_adapter``'s arguments, checked (no file touched yet): what planning, factorizing and
    writing need. Built by `init_job`; the torchrun split (spectra.distributed.init) builds one
    per rank, with that rank's device."""

    source: str | Path
    init: Initializer
    out: Path
    rank: int
    targets: str | Sequence[str]
    allocation_options: dict[str, Any]
    alpha: float | None
    rslora: bool
    svd: str
    device: torch.device
    dtype: str
    seed: int
    stats: dict[str, Any] | None
    ranks: Mapping[str, int] | None
    alphas: Mapping[str, float] | None
    calibration: CalibrationRequest | None
    force: bool

    @property
    def adapter_dtype(self) -> torch.dtype:
        return storage_dtype_of(self.dtype)

    @property
    def weights_only(self) -> bool:
        """True when the factors depend on the weights alone (no calibration statistics), so
        any process holding the checkpoint can compute any matrix's factors."""
        return not self.init.needs_calibration and self.stats is None and self.calibration is None


@dataclass(frozen=True)
class PlannedInit:
    """The selected target matrices, how their ranks were chosen and the resulting plan."""

    selected: list[Any]
    choice: _Choice
    plan: AdapterPlan


def init_job(
    source: str | Path,
    *,
    method: str = "pissa",
    rank: int = 16,
    targets: str | Sequence[str] = "q,k,v,o,up,gate,down",
    out: str | Path,
    allocator: str | None = None,
    budget: int | None = None,
    budget_unit: str = "rank",
    min_rank: int = 1,
    max_rank: int | None = None,
    alpha: float | None = None,
    rslora: bool = False,
    exact: bool = False,
    svd: str = "auto",
    device: str = "auto",
    dtype: str = "float32",
    seed: int = 0,
    stats: dict[str, Any] | None = None,
    ranks: Mapping[str, int] | None = None,
    alphas: Mapping[str, float] | None = None,
    calibration: CalibrationRequest | None = None,
    force: bool = False,
) -> InitJob:
    """Check ``init_adapter``'s arguments (same meaning, see there) into an InitJob. Touches no
    file: the output folder is checked by the caller (``check_output_dir``)."""
    # A local path is recorded absolute (manifest, base_model_name_or_path), so the outputs
    # still point at the right base when used from another folder (e.g. by `spectra convert`).
    if isinstance(source, (str, Path)) and Path(source).expanduser().exists():
        source = str(Path(source).expanduser().resolve())
    init = get_initializer(method)
    storage_dtype_of(dtype)
    if rank < 1:
        raise ValidationError(f"rank must be >= 1, got {rank}")
    return InitJob(
        source=source,
        init=init,
        out=Path(out).expanduser().absolute(),
        rank=rank,
        targets=targets,
        allocation_options={
            "allocator": allocator,
            "budget": budget,
            "budget_unit": budget_unit,
            "min_rank": min_rank,
            "max_rank": max_rank,
        },
        alpha=alpha,
        rslora=rslora,
        svd="exact" if exact else svd,
        device=resolve_device(device),
        dtype=dtype,
        seed=seed,
        stats=stats,
        ranks=ranks,
        alphas=alphas,
        calibration=calibration,
        force=force,
    )


def plan_init(ckpt: Any, job: InitJob) -> PlannedInit:
    """Targets, ranks (explicit, allocated or uniform; then calibration) and the plan, for the
    open checkpoint ``ckpt``. Deterministic for a given checkpoint and job."""
    selected = select_targets(ckpt.matrices(), job.targets)
    choice = _choose_ranks(
        ckpt,
        selected,
        job.init,
        source=job.source,
        rank=job.rank,
        ranks=job.ranks,
        allocation_options=job.allocation_options,
        stats=job.stats,
        alpha=job.alpha,
        rslora=job.rslora,
        calibration=job.calibration,
        device=job.device,
    )
    alphas = job.alphas if job.alphas is not None else choice.alphas
    plan = build_plan(
        selected,
        method=job.init.name,
        targets=job.targets,
        rank=job.rank,
        ranks=choice.ranks,
        alpha=job.alpha,
        alphas=_explicit(selected, alphas, "alphas"),
        rslora=job.rslora,
        allocation=choice.allocation,
    )
    return PlannedInit(selected, choice, plan)


def write_init(
    ckpt: Any,
    job: InitJob,
    planned: PlannedInit,
    *,
    factors: Mapping[str, Factors] | None = None,
    progress: Progress | None = None,
    started: float | None = None,
) -> InitResult:
    """Factorize (or take from ``factors``, keyed by weight name), compute residuals and errors,
    and write the output folder atomically; the output folder must have been checked."""
    from spectra.outdir import atomic_output_dir

    started = time.perf_counter() if started is None else started
    plan, choice = planned.plan, planned.choice
    ctx = {
        "svd": job.svd,
        "seed": job.seed,
        "device": job.device,
        "stats": choice.stats or {},
        "matrices": planned.selected,
        "adapter_dtype": job.adapter_dtype,
    }
    runner = _Runner(ckpt, plan, job.init, ctx, progress, factors=factors)
    options: dict[str, Any] = {
        "rank": job.rank,
        "alpha": job.alpha,
        "rslora": job.rslora,
        "svd": job.svd,
        "device": str(job.device),
        "dtype": job.dtype,
        "seed": job.seed,
        "targets": list(plan.targets),
    }
    with atomic_output_dir(job.out, force=job.force) as tmp:
        _write_outputs(
            tmp, job.out, ckpt, runner, plan, job.adapter_dtype, str(job.source), options, choice
        )
    final = job.out
    return InitResult(
        out=final,
        adapter_dir=final / ADAPTER_DIR,
        residual_dir=final / RESIDUAL_DIR if job.init.mutates_base else None,
        manifest_path=final / "spectra.json",
        plan=plan,
        errors=dict(runner.errors),
        seconds=time.perf_counter() - started,
        info=dict(runner.info),
        calibration=choice.calibration,
    )


def init_adapter(
    source: str | Path,
    *,
    method: str = "pissa",
    rank: int = 16,
    targets: str | Sequence[str] = "q,k,v,o,up,gate,down",
    out: str | Path,
    allocator: str | None = None,
    budget: int | None = None,
    budget_unit: str = "rank",
    min_rank: int = 1,
    max_rank: int | None = None,
    alpha: float | None = None,
    rslora: bool = False,
    exact: bool = False,
    svd: str = "auto",
    device: str = "auto",
    dtype: str = "float32",
    seed: int = 0,
    stats: dict[str, Any] | None = None,
    ranks: Mapping[str, int] | None = None,
    alphas: Mapping[str, float] | None = None,
    calibration: CalibrationRequest | None = None,
    force: bool = False,
    progress: Progress | None = None,
    factors: Mapping[str, Factors] | None = None,
) -> InitResult:
    """Initialize LoRA adapters on ``targets`` of ``source`` with ``method`` and write them.

    method: a registered initializer (pissa, milora, olora, ...); rank: uniform rank, or the
    mean rank when ``allocator`` is given without ``budget``; allocator/budget/budget_unit/
    min_rank/max_rank: see spectra.adapt.allocate; alpha: LoRA alpha for every module (None:
    alpha = r per module); rslora: scale alpha/sqrt(r); exact: force the exact SVD (same as
    svd="exact"); dtype: storage dtype of the adapter (the factors are rounded to it before the
    residual is computed, so the residual absorbs that rounding); stats: per-module calibration
    statistics (module path -> statistics) for methods that need them, used as given; ranks:
    explicit rank per target (weight name or module path; 0 = no adapter there), instead of
    rank/allocator; alphas: explicit alpha per target (same keys), over ``alpha``; calibration:
    how to compute statistics for a method that needs them when ``stats`` is not given (None:
    the built-in corpus with default options; see spectra.adapt.calib_step) -- EVA's
    redistributed ranks and adjusted alphas then reach the plan. A method with a
    ``default_allocator`` (lamda++) uses it when neither ``allocator`` nor ``ranks`` is given.
    factors: precomputed ``Factors`` (``A (r, n)``, ``B (m, r)``, info) per weight name, e.g.
    from other processes (spectra.distributed.init); they are used instead of calling the
    method for those matrices (checked like the method's own), while residuals and errors are
    computed here from the weights exactly as for computed factors.
    Returns an InitResult.
    """
    from spectra.outdir import check_output_dir
    from spectra.sources.checkpoint import Checkpoint

    started = time.perf_counter()
    job = init_job(
        source,
        method=method,
        rank=rank,
        targets=targets,
        out=out,
        allocator=allocator,
        budget=budget,
        budget_unit=budget_unit,
        min_rank=min_rank,
        max_rank=max_rank,
        alpha=alpha,
        rslora=rslora,
        exact=exact,
        svd=svd,
        device=device,
        dtype=dtype,
        seed=seed,
        stats=stats,
        ranks=ranks,
        alphas=alphas,
        calibration=calibration,
        force=force,
    )
    check_output_dir(job.out, force=force)  # refuse before any reading, SVD or calibration
    with Checkpoint.open(job.source) as ckpt:
        planned = plan_init(ckpt, job)
        return write_init(ckpt, job, planned, factors=factors, progress=progress, started=started)
