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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from spectra.adapt.allocate import Allocation, Budget, ModuleStats, allocate, get_allocator
from spectra.adapt.factorize import reconstruction_error, residual
from spectra.adapt.plan import AdapterPlan, build_plan, select_targets
from spectra.adapt.registry import InitContext, Initializer, check_factors, get_initializer
from spectra.device import resolve_device
from spectra.errors import ValidationError

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
        W_res = None
        if self.init.mutates_base:
            from spectra.export.residual import storage_dtype

            W_res = residual(W, f.A, f.B, mp.scale, dtype=storage_dtype(ref.tensor.dtype))
        self.errors[key] = reconstruction_error(W, W_res, f.A, f.B, mp.scale)
        self.info[key] = dict(f.info, rank=mp.rank, error=self.errors[key])
        self.factors[mp.module] = (f.A.cpu(), f.B.cpu())
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
    force: bool = False,
    progress: Progress | None = None,
) -> InitResult:
    """Initialize LoRA adapters on ``targets`` of ``source`` with ``method`` and write them.

    method: a registered initializer (pissa, milora, olora, ...); rank: uniform rank, or the
    mean rank when ``allocator`` is given without ``budget``; allocator/budget/budget_unit/
    min_rank/max_rank: see spectra.adapt.allocate; alpha: LoRA alpha for every module (None:
    alpha = r per module); rslora: scale alpha/sqrt(r); exact: force the exact SVD (same as
    svd="exact"); dtype: storage dtype of the adapter; stats: per-module calibration statistics
    for methods that need them. Returns an InitResult.
    """
    from spectra.export.outdir import atomic_output_dir
    from spectra.sources import Checkpoint

    started = time.perf_counter()
    init = get_initializer(method)
    adapter_dtype = storage_dtype_of(dtype)
    if rank < 1:
        raise ValidationError(f"rank must be >= 1, got {rank}")
    if init.needs_calibration and not stats:
        raise ValidationError(f"method {init.name!r} needs calibration statistics (stats=...)")
    dev = resolve_device(device)
    svd_mode = "exact" if exact else svd
    with Checkpoint.open(source) as ckpt:
        selected = select_targets(ckpt.matrices(), targets)
        ranks, allocation = _ranks(
            ckpt,
            selected,
            rank=rank,
            allocator=allocator,
            budget=budget,
            budget_unit=budget_unit,
            min_rank=min_rank,
            max_rank=max_rank,
            device=dev,
        )
        plan = build_plan(
            selected,
            method=init.name,
            targets=targets,
            rank=rank,
            ranks=ranks,
            alpha=alpha,
            rslora=rslora,
            allocation=allocation,
        )
        ctx = {
            "svd": svd_mode,
            "seed": seed,
            "device": dev,
            "stats": stats or {},
            "matrices": selected,
        }
        runner = _Runner(ckpt, plan, init, ctx, progress)
        options = {
            "rank": rank,
            "alpha": alpha,
            "rslora": rslora,
            "svd": svd_mode,
            "device": str(dev),
            "dtype": dtype,
            "seed": seed,
            "targets": list(plan.targets),
        }
        final = Path(out).expanduser().absolute()
        with atomic_output_dir(final, force=force) as tmp:
            _write_outputs(tmp, final, ckpt, runner, plan, adapter_dtype, str(source), options)
    return InitResult(
        out=final,
        adapter_dir=final / ADAPTER_DIR,
        residual_dir=final / RESIDUAL_DIR if init.mutates_base else None,
        manifest_path=final / "spectra.json",
        plan=plan,
        errors=dict(runner.errors),
        seconds=time.perf_counter() - started,
        info=dict(runner.info),
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
) -> None:
    from spectra.export.manifest import build_manifest, write_manifest
    from spectra.export.peft import write_peft_adapter
    from spectra.export.residual import write_residual_checkpoint

    if runner.init.mutates_base:
        write_residual_checkpoint(list(ckpt.files), tmp / RESIDUAL_DIR, runner.replace)
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
        },
    )
    write_manifest(tmp, manifest)
