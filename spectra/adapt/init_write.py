"""Executing an adapter plan into the output folder of `init_adapter`.

`_Runner` initializes one matrix at a time (read, factorize with the method through
`factor_matrix` or take precomputed factors, round the factors to the adapter dtype, residual and
reconstruction error), keeping only the small factors.
`_write_outputs` drives it: for a method that changes the base the residual checkpoint is
streamed tensor by tensor through ``_Runner.replace``; then the PEFT adapter and the manifest
are written. The folder is a temporary sibling that `init_adapter` renames into place.

Layering note: with init.py, the one place in ``adapt`` that imports ``export`` (lazily, inside
the functions).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spectra.adapt.factorize import reconstruction_error, residual
from spectra.adapt.init_ranks import _Choice
from spectra.adapt.plan import AdapterPlan, ModulePlan
from spectra.adapt.registry import Factors, InitContext, Initializer, check_factors
from spectra.errors import ValidationError

Progress = Callable[[int, int, str], None]
ADAPTER_DIR = "adapter"
RESIDUAL_DIR = "residual_base"


def as_stored(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` rounded to the storage ``dtype`` and back to its own dtype (exact for float32)."""
    return t.to(dtype).to(t.dtype) if dtype != t.dtype else t


def factor_matrix(
    init: Initializer, W: Tensor, mp: ModulePlan, *, svd: str, seed: int, stats: Any = None
) -> Factors:
    """The method's checked factors ``A (r, n)``, ``B (m, r)`` for one planned matrix ``W (m, n)``
    (on W's device). The one place a plan's matrix is factorized, whichever process does it."""
    ctx = InitContext(
        key=mp.key, module=mp.module, svd=svd, seed=seed, device=W.device, stats=stats
    )
    f = init.init(W, mp.rank, mp.scale, ctx)
    check_factors(f, mp.shape, mp.rank, init.name)
    return f


class _Runner:
    """Initializes one matrix at a time and keeps the (small) factors and facts.

    ``factors`` (weight name -> Factors, any device): precomputed factors used instead of calling
    the method; the weights are still read for the residual and the error."""

    def __init__(
        self,
        ckpt: Any,
        plan: AdapterPlan,
        init: Initializer,
        ctx: dict[str, Any],
        progress: Progress | None,
        factors: Mapping[str, Factors] | None = None,
    ) -> None:
        self.ckpt, self.plan, self.init, self.ctx = ckpt, plan, init, ctx
        self.todo = plan.by_key()
        self.refs = {m.key: m for m in ctx.pop("matrices")}
        self.given = dict(factors or {})
        unknown = sorted(set(self.given) - set(self.todo))
        if unknown:
            raise ValidationError(
                f"precomputed factors for {len(unknown)} matrix(es) outside the plan, e.g. "
                f"{unknown[0]!r}: pass factors keyed by the planned weight names"
            )
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        self.errors: dict[str, float] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.progress = progress

    def _factors(self, key: str, W: Tensor) -> Factors:
        mp = self.todo[key]
        given = self.given.get(key)
        if given is None:
            stats = self.ctx["stats"].get(mp.module)
            return factor_matrix(
                self.init, W, mp, svd=self.ctx["svd"], seed=self.ctx["seed"], stats=stats
            )
        check_factors(given, mp.shape, mp.rank, self.init.name)
        return Factors(given.A.to(W.device), given.B.to(W.device), given.info)

    def run(self, key: str) -> Tensor | None:
        """Factors for matrix ``key``; returns its residual in the storage dtype (or None when
        the method leaves the base unchanged)."""
        mp = self.todo[key]
        ref = self.refs[key]
        W = self.ckpt.read(ref, dtype=torch.float32, device=str(self.ctx["device"]))
        f = self._factors(key, W)
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
    from spectra.export.residual import write_residual_checkpoint
    from spectra.formats.peft import AdapterContent, write_peft_adapter

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
    content = AdapterContent(
        factors,
        plan.alphas,
        rslora=plan.rslora,
        base_model_name_or_path=base_name,
        dtype=adapter_dtype,
    )
    write_peft_adapter(tmp / ADAPTER_DIR, content)
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
