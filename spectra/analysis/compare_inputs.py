"""What `compare` reads besides the two checkpoints' matrices: whether FINETUNED is a PEFT
adapter folder (and whether that adapter was trained on a residual base, which makes BASE +
adapter the wrong fine-tuned model), and the base's left singular vectors from the spectrum cache.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from spectra.errors import SourceError
from spectra.formats.files import read_json_input
from spectra.sources.adapters import LoraAdapter


class ResidualBaseWarning(UserWarning):
    """The adapter was trained on a residual base (PiSSA-style init), not on BASE itself."""


# PEFT initializations that subtract the adapter from the base weights before training
_MUTATING_PEFT_INITS = ("pissa", "olora", "corda", "milora")


def open_adapter(source: str | Path) -> Any | None:
    """A LoraAdapter when `source` is a PEFT adapter folder, else None.

    An adapter trained from a `spectra init` output (PiSSA, MiLoRA, OLoRA, CorDA, LaMDA++) on
    its residual base is recognized (`init_folder`: its ``base_model_name_or_path`` is that
    residual base, or it sits in the init's folder) and read as the true update on the original
    base, ``s (B A - B0 A0)`` with the init's factors; BASE + s B A would count the principal
    part twice. Warns (ResidualBaseWarning) when the base changed but the initial factors are not
    at hand (PEFT's own ``init_lora_weights="pissa"``; the init's own ``adapter/``): then
    comparing W_0 + s B A against W_0 counts the principal components twice. Convert such an
    adapter first (`spectra convert`), or compare against its residual base.
    """
    path = Path(source).expanduser()
    if not (path / "adapter_config.json").is_file():
        return None
    adapter = LoraAdapter.open(path)
    init = init_folder(path, adapter.config)
    if init is not None:
        adapter.close()
        return LoraAdapter.open(path, initial=init / INIT_ADAPTER_DIR)
    method = _mutating_init(path, adapter.config)
    if method:
        warnings.warn(
            f"{path} was initialized with {method}, which changes the base: the fine-tuned model "
            "is residual base + adapter, not BASE + adapter. Compare against the residual base, "
            "or run `spectra convert` first to get a plain LoRA on the original base",
            ResidualBaseWarning,
            stacklevel=3,
        )
    return adapter


# The folders `spectra init` writes (spectra.jobs.init ADAPTER_DIR, RESIDUAL_DIR)
INIT_ADAPTER_DIR = "adapter"
INIT_RESIDUAL_DIR = "residual_base"


def init_folder(path: Path, config: dict[str, Any]) -> Path | None:
    """The `spectra init` output folder (with ``spectra.json``, ``adapter/`` and
    ``residual_base/``) that the adapter at `path` was trained from, or None: its
    ``base_model_name_or_path`` names that ``residual_base/`` (absolute, or relative to the
    current folder or the adapter's), or the adapter sits in that folder. The init's own
    ``adapter/`` is not "trained from" it (None)."""
    folders = []
    named = config.get("base_model_name_or_path")
    if isinstance(named, str) and 0 < len(named) <= 4096:
        given = Path(named).expanduser()
        tries = [given] if given.is_absolute() else [given, path / given, path.parent / given]
        folders += [t.parent for t in tries if t.name == INIT_RESIDUAL_DIR]
    folders.append(path.parent)
    for folder in folders:
        try:
            if not _is_init_with_residual(folder):
                continue
            found = folder.resolve()
            if (found / INIT_ADAPTER_DIR).resolve() == path.resolve():
                return None
        except (OSError, ValueError, RuntimeError):  # a hostile name: too long, NUL, a loop
            continue
        return found
    return None


def _is_init_with_residual(folder: Path) -> bool:
    if not (folder / INIT_RESIDUAL_DIR).is_dir():
        return False
    if not (folder / INIT_ADAPTER_DIR / "adapter_config.json").is_file():
        return False
    recorded = _init_manifest(folder)
    return recorded is not None


def _init_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        recorded = read_json_input(folder / "spectra.json", "manifest")
    except SourceError:
        return None
    if not isinstance(recorded, dict) or recorded.get("kind") != "init":
        return None
    return recorded


def _mutating_init(path: Path, config: dict[str, Any]) -> str | None:
    """Name of a base-changing init recorded by PEFT's config or by a spectra.json next to it."""
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_MUTATING_PEFT_INITS):
        return init
    recorded = _init_manifest(path.parent)
    # `spectra init` writes residual_base/ next to spectra.json exactly when the method changed
    # the base (PiSSA, MiLoRA, OLoRA, CorDA, LaMDA++), so no knowledge of the methods is needed.
    if recorded is not None and (path.parent / INIT_RESIDUAL_DIR).is_dir():
        return str(recorded.get("method"))
    return None
