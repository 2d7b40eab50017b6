"""``init_adapter``: a checkpoint in, a PEFT adapter (+ residual base, + manifest) out.

Output folder (written to a temporary sibling, renamed into place when complete):
``adapter/`` (PEFT LoRA adapter), ``residual_base/`` (only for methods that change the base: the
complete checkpoint, sharded like the source, with config and tokenizer files) and
``spectra.json`` (manifest). Load with::

    base = AutoModel.from_pretrained(out / "residual_base")
    model = PeftModel.from_pretrained(base, out / "adapter", is_trainable=True)

Memory: one weight matrix at a time (plus the adapter factors); the residual base is streamed
tensor by tensor (spectra.export.residual).

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
from spectra.adapt.registry import get_initializer
from spectra.device import resolve_device
from spectra.errors import ValidationError

if TYPE_CHECKING:
    from spectra.adapt.calib_step import CalibrationRequest

__all__ = [
    "ADAPTER_DIR",
    "RESIDUAL_DIR",
    "STORAGE_DTYPES",
    "InitResult",
    "Progress",
    "_Choice",
    "_Runner",
    "_choose_ranks",
    "_explicit",
    "_ranks",
    "_write_outputs",
    "as_stored",
    "init_adapter",
    "module_stats",
    "storage_dtype_of",
]

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
