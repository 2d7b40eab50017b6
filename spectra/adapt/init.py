"""``init_adapter``: a checkpoint in, a PEFT adapter (+ residual base, + manifest) out.

Output folder (written to a temporary sibling, renamed into place when complete):
``adapter/`` (PEFT LoRA adapter), ``residual_base/`` (only for methods that change the base: the
complete checkpoint, sharded like the source, with config and tokenizer files) and
``spectra.json`` (manifest). Load with::

    base = AutoModel.from_pretrained(out / "residual_base")
    model = PeftModel.from_pretrained(base, out / "adapter", is_trainable=True)

Memory: one weight matrix at a time (plus the adapter factors); the residual base is streamed
tensor by tensor (spectra.export.residual).

Layering note: this module sits at the end of ``adapt`` and drives ``export``'s writers; it is the
one place in ``adapt`` that imports ``export`` (lazily, inside the functions).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from spectra.adapt.allocate import Allocation, Budget, ModuleStats, allocate, get_allocator
from spectra.adapt.factorize import reconstruction_error, residual
from spectra.adapt.plan import AdapterPlan, build_plan, select_targets
from spectra.adapt.registry import InitContext, Initializer, check_factors, get_initializer
from spectra.device import resolve_device
from spectra.errors import ValidationError

if TYPE_CHECKING:
    from spectra.adapt.calib_step import CalibrationRequest

Progress = Callable[[int, int, str], None]
ADAPTER_DIR = "adapter"
RESIDUAL_DIR = "residual_base"
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def module_stats(
    ckpt: Any, matrices: Sequence[Any], needs: str | None, device: torch.device
) -> list[ModuleStats]:
    """ModuleStats for the allocators: exact spectra (float64) when needed, and HT-SR alphas
    (power-law fit of ``lambda = S^2``, spectra.analysis.powerlaw) for the alpha allocators."""
    from spectra.analysis.powerlaw import fit_powerlaw
    from spectra.linalg import exact_svdvals

    out = []
    values: dict[str, np.ndarray] = {}
    if needs is not None:
        for ref, W in ckpt.read_many(matrices, dtype=torch.float32, device=str(device)):
            values[ref.key] = exact_svdvals(W).cpu().numpy()
    for mat in matrices:
        S = values.get(mat.key)
        alpha = None
        if needs == "alpha" and S is not None:
            fit = fit_powerlaw(S**2)
            alpha = fit.alpha if fit.ok else None
        out.append(ModuleStats(mat.key, tuple(mat.shape), mat.layer, S, alpha))
    return out


def as_stored(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` rounded to the storage ``dtype`` and back to its own dtype (exact for float32)."""
    return t.to(dtype).to(t.dtype) if dtype != t.dtype else t


class _Runner:
    """Initializes one matrix at a time and keeps the (small) factors and facts."""

    def __init__(
        self,
        ckpt: Any,
        plan: AdapterPlan,
        init: Initializer,
        ctx: dict[str, Any],
        progress: Progress | None,
    ) -> None:
        self.ckpt, self.plan, self.init, self.ctx = ckpt, plan, init, ctx
        self.todo = plan.by_key()
        self.refs = {m.key: m for m in ctx.pop("matrices")}
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        self.errors: dict[str, float] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.progress = progress

    def run(self, key: str) -> Tensor | None:
        """Factors for matrix ``key``; returns its residual in the storage dtype (or None when
        the method leaves the base unchanged)."""
        mp = self.todo[key]
        ref = self.refs[key]
        W = self.ckpt.read(ref, dtype=torch.float32, device=str(self.ctx["device"]))
        ctx = InitContext(
            key=key,
            module=mp.module,
            svd=self.ctx["svd"],
            seed=self.ctx["seed"],
            device=self.ctx["device"],
            stats=self.ctx["stats"].get(mp.module),
        )
        f = self.init.init(W, mp.rank, mp.scale, ctx)
        check_factors(f, mp.shape, mp.rank, self.init.name)
        # The adapter is stored in the adapter dtype: round A and B to it first, so the residual
        # absorbs that rounding (W_res + s B A == W up to the residual's own storage rounding)
        # and the reported error is the error of what is written.
        A, B = as_stored(f.A, self.ctx["adapter_dtype"]), as_stored(f.B, self.ctx["adapter_dtype"])
        W_res = None
        if self.init.mutates_base:
            from spectra.export.residual import storage_dtype

            W_res = residual(W, A, B, mp.scale, dtype=storage_dtype(ref.tensor.dtype))
        self.errors[key] = reconstruction_error(W, W_res, A, B, mp.scale)
        self.info[key] = dict(f.info, rank=mp.rank, error=self.errors[key])
        self.factors[mp.module] = (A.cpu(), B.cpu())
        if self.progress is not None:
            self.progress(len(self.factors), len(self.todo), key)
        return None if W_res is None else W_res.cpu()

    def replace(self, name: str) -> Tensor | None:
        return self.run(name) if name in self.todo else None


def _ranks(
    ckpt: Any,
    selected: list,
    *,
    rank: int,
    allocator: str | None,
    budget: int | None,
    budget_unit: str,
    min_rank: int,
    max_rank: int | None,
    device: torch.device,
) -> tuple[dict[str, int] | None, Allocation | None]:
    if allocator is None:
        if budget is not None:
            raise ValidationError("--budget needs --allocate (uniform, energy, alpha-power, ...)")
        return None, None
    spec = get_allocator(allocator)
    total = budget if budget is not None else rank * len(selected)
    if budget is None and budget_unit != "rank":
        raise ValidationError("a params budget needs an explicit --budget")
    stats = module_stats(ckpt, selected, spec.needs, device)
    alloc = allocate(
        spec.name,
        stats,
        Budget(total, budget_unit),  # type: ignore[arg-type]
        min_rank=min_rank,
        max_rank=max_rank,
    )
    return alloc.ranks, alloc


@dataclass(frozen=True)
class _Choice:
    """Ranks (weight key -> rank, None: uniform), the allocation behind them, calibration
    statistics, alphas from calibration (EVA) and the manifest's calibration record."""

    ranks: dict[str, int] | None
    allocation: Allocation | None
    stats: dict[str, Any] | None
    alphas: dict[str, float] | None = None
    calibration: dict[str, Any] | None = None


def _explicit(
    selected: Sequence[Any], values: Mapping[str, Any] | None, what: str
) -> dict[str, Any] | None:
    """Per-target values keyed by weight name or module path -> keyed by weight name."""
    if values is None:
        return None
    by_path = {m.key.removesuffix(".weight"): m.key for m in selected}
    keys = set(by_path.values())
    out: dict[str, Any] = {}
    for name, value in values.items():
        key = name if name in keys else by_path.get(name)
        if key is None:
            raise ValidationError(
                f"{what} names {name!r}, which is not one of the selected targets "
                f"(e.g. {', '.join(sorted(by_path)[:3])})"
            )
        out[key] = value
    return out


def _choose_ranks(
    ckpt: Any,
    selected: list,
    init: Initializer,
    *,
    source: str | Path,
    rank: int,
    ranks: Mapping[str, int] | None,
    allocation_options: dict[str, Any],
    stats: dict[str, Any] | None,
    alpha: float | None,
    rslora: bool,
    calibration: CalibrationRequest | None,
    device: torch.device,
) -> _Choice:
    """Explicit ranks, or an allocator's (the method's default allocator when none is named),
    or uniform; then, for a method that needs calibration and got no statistics, the calibration
    step (which may move ranks and set alphas: EVA)."""
    allocator = allocation_options["allocator"]
    if ranks is not None:
        if allocator is not None:
            raise ValidationError("give explicit ranks or an allocator (--allocate), not both")
        choice = _Choice(_explicit(selected, ranks, "ranks"), None, stats)
    else:
        if allocator is None:
            allocator = getattr(init, "default_allocator", None)
        chosen, allocation = _ranks(
            ckpt,
            selected,
            rank=rank,
            device=device,
            **{**allocation_options, "allocator": allocator},
        )
        choice = _Choice(chosen, allocation, stats)
    if not init.needs_calibration or stats:
        return choice
    from spectra.adapt.calib_step import CalibrationRequest, run_calibration_step

    outcome = run_calibration_step(
        source,
        init.name,
        selected,
        choice.ranks or {m.key: rank for m in selected},
        calibration or CalibrationRequest(),
        alpha=alpha,
        device=device,
        rslora=rslora,
    )
    return _Choice(outcome.ranks, choice.allocation, outcome.stats, outcome.alphas, outcome.summary)


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
    Returns an InitResult.
    """
    from spectra.export.outdir import atomic_output_dir, check_output_dir
    from spectra.sources import Checkpoint

    started = time.perf_counter()
    # A local path is recorded absolute (manifest, base_model_name_or_path), so the outputs
    # still point at the right base when used from another folder (e.g. by `spectra convert`).
    if isinstance(source, (str, Path)) and Path(source).expanduser().exists():
        source = str(Path(source).expanduser().resolve())
    init = get_initializer(method)
    adapter_dtype = storage_dtype_of(dtype)
    if rank < 1:
        raise ValidationError(f"rank must be >= 1, got {rank}")
    final = Path(out).expanduser().absolute()
    check_output_dir(final, force=force)  # refuse before any reading, SVD or calibration
    dev = resolve_device(device)
    svd_mode = "exact" if exact else svd
    with Checkpoint.open(source) as ckpt:
        selected = select_targets(ckpt.matrices(), targets)
        choice = _choose_ranks(
            ckpt,
            selected,
            init,
            source=source,
            rank=rank,
            ranks=ranks,
            allocation_options={
                "allocator": allocator,
                "budget": budget,
                "budget_unit": budget_unit,
                "min_rank": min_rank,
                "max_rank": max_rank,
            },
            stats=stats,
            alpha=alpha,
            rslora=rslora,
            calibration=calibration,
            device=dev,
        )
        plan = build_plan(
            selected,
            method=init.name,
            targets=targets,
            rank=rank,
            ranks=choice.ranks,
            alpha=alpha,
            alphas=_explicit(selected, alphas if alphas is not None else choice.alphas, "alphas"),
            rslora=rslora,
            allocation=choice.allocation,
        )
        ctx = {
            "svd": svd_mode,
            "seed": seed,
            "device": dev,
            "stats": choice.stats or {},
            "matrices": selected,
            "adapter_dtype": adapter_dtype,
        }
        runner = _Runner(ckpt, plan, init, ctx, progress)
        options: dict[str, Any] = {
            "rank": rank,
            "alpha": alpha,
            "rslora": rslora,
            "svd": svd_mode,
            "device": str(dev),
            "dtype": dtype,
            "seed": seed,
            "targets": list(plan.targets),
        }
        with atomic_output_dir(final, force=force) as tmp:
            _write_outputs(
                tmp, final, ckpt, runner, plan, adapter_dtype, str(source), options, choice
            )
    return InitResult(
        out=final,
        adapter_dir=final / ADAPTER_DIR,
        residual_dir=final / RESIDUAL_DIR if init.mutates_base else None,
        manifest_path=final / "spectra.json",
        plan=plan,
        errors=dict(runner.errors),
        seconds=time.perf_counter() - started,
        info=dict(runner.info),
        calibration=choice.calibration,
    )


def _write_outputs(
    tmp: Path,
    final: Path,
    ckpt: Any,
    runner: _Runner,
    plan: AdapterPlan,
    adapter_dtype: torch.dtype,
    source: str,
    options: dict[str, Any],
    choice: _Choice,
) -> None:
    from spectra.export.manifest import build_manifest, write_manifest
    from spectra.export.peft import write_peft_adapter
    from spectra.export.residual import write_residual_checkpoint

    if runner.init.mutates_base:
        # A single-file source's folder is not a checkpoint: take no side files from it.
        folder_source = not Path(source).expanduser().is_file()
        write_residual_checkpoint(
            list(ckpt.files), tmp / RESIDUAL_DIR, runner.replace, copy_files=folder_source
        )
        base_name = str(final / RESIDUAL_DIR)
    else:
        for mp in plan.modules:
            runner.run(mp.key)
        base_name = source
    missing = set(runner.todo) - set(runner.errors)
    if missing:
        raise ValidationError(f"targets not found in the shards: {sorted(missing)[:3]}")
    factors = {m.module: runner.factors[m.module] for m in plan.modules}
    write_peft_adapter(
        tmp / ADAPTER_DIR,
        factors,
        plan.alphas,
        rslora=plan.rslora,
        base_model_name_or_path=base_name,
        dtype=adapter_dtype,
    )
    manifest = build_manifest(
        kind="init",
        method=plan.method,
        source=source,
        source_files=ckpt.files,
        options=options,
        plan=plan.to_dict(),
        matrices=runner.info,
        extra={
            "allocation": None if plan.allocation is None else plan.allocation.to_dict(),
            "ranks": plan.ranks,
            "max_reconstruction_error": max(runner.errors.values()),
            "calibration": choice.calibration,
        },
    )
    write_manifest(tmp, manifest)
