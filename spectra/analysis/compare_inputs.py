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

    Warns (ResidualBaseWarning) when the adapter comes from an initialization that changed the
    base (PiSSA, MiLoRA, OLoRA, CorDA): then the fine-tuned model is W_res + s B A, and comparing
    W_0 + s B A against W_0 counts the principal components twice. Convert such an adapter first
    (`spectra convert`), or compare against its residual base.
    """
    path = Path(source).expanduser()
    if not (path / "adapter_config.json").is_file():
        return None
    adapter = LoraAdapter.open(path)
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


def _mutating_init(path: Path, config: dict[str, Any]) -> str | None:
    """Name of a base-changing init recorded by PEFT's config or by a spectra.json next to it."""
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_MUTATING_PEFT_INITS):
        return init
    manifest = path.parent / "spectra.json"
    try:
        recorded = read_json_input(manifest, "manifest")
    except SourceError:
        return None
    if not isinstance(recorded, dict):
        return None
    method = recorded.get("method")
    # `spectra init` writes residual_base/ next to spectra.json exactly when the method changed
    # the base (PiSSA, MiLoRA, OLoRA, CorDA, LaMDA++), so no knowledge of the methods is needed.
    if recorded.get("kind") == "init" and (path.parent / "residual_base").is_dir():
        return str(method)
    return None
