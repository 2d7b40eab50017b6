"""``convert``: a trained adapter whose initialization changed the base (PiSSA, MiLoRA, OLoRA,
CorDA) -> a plain rank-2r LoRA on the original, unmodified base, as a PEFT adapter folder.

Reads the initial and the trained adapter folders, converts them in memory
(spectra.export.convert.convert_adapters: ``A' = [A; A0]``, ``B' = [B, -B0]``, alpha doubled;
docs/methods.md section 4), finds the original base in the init's ``spectra.json`` and writes the
result atomically with its own manifest.
"""

from __future__ import annotations

from pathlib import Path

import torch

from spectra.errors import SourceError, ValidationError
from spectra.export.convert import carried_config, convert_adapters
from spectra.export.manifest import MANIFEST_NAME, build_manifest, read_manifest, write_manifest
from spectra.formats.peft import AdapterContent, PeftAdapter, read_peft_adapter, write_peft_adapter
from spectra.outdir import atomic_output_dir


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
    protect = (init_path, trained_path, base)  # the inputs: never replaced, even with force
    with atomic_output_dir(out, force=force, protect=protect) as tmp:
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


def _adapter_dir(path: Path) -> Path:
    """An init output folder holds ``adapter/``; an adapter folder is taken as it is."""
    return path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path


def _original_base(init_path: Path) -> str | None:
    """The source of the ``spectra init`` run that wrote ``init_path`` (its folder, or its
    ``adapter/`` whose parent holds ``spectra.json``); None when no init manifest names it."""
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


def _dtype_of(adapter: PeftAdapter) -> torch.dtype:
    first = next(iter(adapter.factors.values()))[0]
    return first.dtype
