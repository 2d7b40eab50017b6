"""Turn a trained adapter whose initialization changed the base (PiSSA, MiLoRA, OLoRA, CorDA)
into a plain LoRA on the original, unmodified base.

docs/methods.md section 4: with the initial factors ``A0, B0`` and the trained ``A, B``
(same scale ``s``), the original base is ``W = W_res + s B0 A0``, so the trained model
``W_res + s B A = W + s (B A - B0 A0)``. A rank-2r LoRA with ``A' = [A; A0]`` ``(2r, in)``,
``B' = [B, -B0]`` ``(out, 2r)`` gives exactly that delta if its scale is still ``s``: alpha doubles
(``2 alpha / 2r = alpha / r``), or is multiplied by sqrt(2) under rsLoRA
(``sqrt(2) alpha / sqrt(2r) = alpha / sqrt(r)``). PEFT's
``path_initial_model_for_weight_conversion`` does the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from spectra.errors import SourceError, ValidationError
from spectra.formats.peft import AdapterContent, PeftAdapter, read_peft_adapter, write_peft_adapter


def stack_factors(A: Tensor, B: Tensor, A0: Tensor, B0: Tensor) -> tuple[Tensor, Tensor]:
    """``A' = [A; A0] (2r, in)``, ``B' = [B, -B0] (out, 2r)`` so ``B' A' = B A - B0 A0``."""
    if A.shape != A0.shape or B.shape != B0.shape:
        raise ValidationError(
            f"trained factors A {tuple(A.shape)}, B {tuple(B.shape)} do not match the initial "
            f"A {tuple(A0.shape)}, B {tuple(B0.shape)}: was the adapter trained from this init?"
        )
    A0 = A0.to(A.dtype)
    B0 = B0.to(B.dtype)
    return torch.cat([A, A0], dim=0), torch.cat([B, -B0], dim=1)


def doubled_alpha(alpha: float, *, rslora: bool) -> float:
    """Alpha of the rank-2r LoRA with the same scale: ``2 alpha`` (LoRA), ``sqrt(2) alpha``
    (rsLoRA)."""
    return alpha * (math.sqrt(2.0) if rslora else 2.0)


@dataclass(frozen=True)
class Converted:
    """The rank-2r adapter's factors and alphas, by module path."""

    factors: dict[str, tuple[Tensor, Tensor]]
    alphas: dict[str, float]
    rslora: bool


def convert_adapters(init: PeftAdapter, trained: PeftAdapter) -> Converted:
    """Pure conversion of two adapters in memory (see module docstring)."""
    if set(init.factors) != set(trained.factors):
        only = sorted(set(init.factors) ^ set(trained.factors))[:3]
        raise ValidationError(
            f"initial and trained adapters target different modules (e.g. {only}): "
            "pass the init that this adapter was trained from"
        )
    rslora = trained.settings.use_rslora
    if rslora != init.settings.use_rslora:
        raise ValidationError("initial and trained adapters disagree on use_rslora")
    factors, alphas = {}, {}
    for module in sorted(trained.factors):
        s0, s1 = init.scale(module), trained.scale(module)
        if not math.isclose(s0, s1, rel_tol=1e-6):
            raise ValidationError(
                f"{module}: the LoRA scale changed between init ({s0}) and training ({s1})"
            )
        A, B = trained.factors[module]
        A0, B0 = init.factors[module]
        factors[module] = stack_factors(A, B, A0, B0)
        alphas[module] = doubled_alpha(trained.alpha(module), rslora=rslora)
    return Converted(factors, alphas, rslora)


def _adapter_dir(path: Path) -> Path:
    """An init output folder holds ``adapter/``; an adapter folder is taken as it is."""
    return path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path


def _original_base(init_path: Path) -> str | None:
    """The source of the ``spectra init`` run that wrote ``init_path`` (its folder, or its
    ``adapter/`` whose parent holds ``spectra.json``); None when no init manifest names it."""
    from spectra.export.manifest import MANIFEST_NAME, read_manifest

    folders = [init_path]
    if (init_path / "adapter_config.json").is_file():
        folders.append(init_path.parent)
    for folder in folders:
        if (folder / MANIFEST_NAME).is_file():
            manifest = read_manifest(folder)
            source = manifest.get("source")
            if manifest.get("kind", "init") == "init" and isinstance(source, str) and source:
                return source
    return None


def convert_to_lora(
    init_dir: str | Path,
    trained_dir: str | Path,
    out: str | Path,
    *,
    base: str | None = None,
    force: bool = False,
) -> Path:
    """Write the plain rank-2r LoRA (a PEFT adapter folder, plus ``spectra.json``) to ``out``.

    init_dir: a ``spectra init`` output folder (or its ``adapter/``); trained_dir: the adapter
    saved after training (``PeftModel.save_pretrained``); base: the original base model, written
    as ``base_model_name_or_path`` (None: the ``source`` in the init's ``spectra.json``; without
    one this is a ValidationError, because the trained adapter only names the residual base).
    The result loads with ``PeftModel.from_pretrained(original_base, out)``.
    """
    from spectra.export.manifest import build_manifest, write_manifest
    from spectra.outdir import atomic_output_dir

    init_path, trained_path = Path(init_dir), Path(trained_dir)
    for p, what in ((init_path, "--init"), (trained_path, "--trained")):
        if not p.is_dir():
            raise SourceError(f"{what} folder {str(p)!r} does not exist")
    init = read_peft_adapter(_adapter_dir(init_path))
    trained = read_peft_adapter(_adapter_dir(trained_path))
    conv = convert_adapters(init, trained)
    base = base or _original_base(init_path)
    if base is None:
        raise ValidationError(
            f"cannot tell the original base of --init {str(init_path)!r}: no spectra.json of a "
            "spectra init run in it or its parent (the trained adapter names only the residual "
            "base); pass --base with the model spectra init was run on"
        )
    with atomic_output_dir(out, force=force) as tmp:
        content = AdapterContent(
            conv.factors,
            conv.alphas,
            rslora=conv.rslora,
            base_model_name_or_path=base,
            dtype=_dtype_of(trained),
            other=trained.other,
            config_extra=carried_config(trained),
        )
        write_peft_adapter(tmp, content)
        manifest = build_manifest(
            kind="convert",
            method="lora",
            source=str(base),
            source_files=[],
            options={"init": str(init_path), "trained": str(trained_path)},
            plan={
                "ranks": {m: int(a.shape[0]) for m, (a, _) in conv.factors.items()},
                "alphas": conv.alphas,
                "rslora": conv.rslora,
            },
            matrices={},
        )
        write_manifest(tmp, manifest)
    return Path(out).expanduser().absolute()


# Trained-adapter settings that stay true for the converted one: the extra trained modules
# (a classifier head; its tensors are copied as they are, and PEFT ignores them unless listed)
# and the task type (which PeftModel class wraps the base).
CARRIED_KEYS = ("modules_to_save", "task_type")


def carried_config(trained: PeftAdapter) -> dict[str, object]:
    """The ``CARRIED_KEYS`` of the trained adapter's config that it sets."""
    return {k: trained.config[k] for k in CARRIED_KEYS if trained.config.get(k) is not None}


def _dtype_of(adapter: PeftAdapter) -> torch.dtype:
    first = next(iter(adapter.factors.values()))[0]
    return first.dtype
