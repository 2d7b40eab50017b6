"""Loading the transformers model for calibration, and finding its modules by weight name.

Needs the optional ``calib`` extra (transformers). The model is loaded with
``AutoModel.from_pretrained(folder)`` (no ``trust_remote_code``; ``HF_HUB_OFFLINE`` is honoured by
transformers itself), in eval mode, with its tokenizer from the same folder. Weights are read
from safetensors only: a folder with only pickled weights is refused before transformers sees it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectra.device import resolve_device
from spectra.errors import SourceError, SpectraError
from spectra.formats.files import check_input


class MissingExtraError(SpectraError):
    """An optional dependency (extra) is not installed."""


def require_transformers() -> Any:
    """Import transformers or raise a one-line error naming the ``calib`` extra."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - the dev environment has it
        raise MissingExtraError(
            "calibration (CorDA, EVA) needs transformers: pip install 'spectra[calib]'"
        ) from exc
    return transformers


def load_model(source: str | Path, device: str | torch.device = "auto") -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local folder or a cached Hub id, eval mode, on `device`.

    Weights are read from safetensors only (``use_safetensors=True``): a ``pytorch_model.bin`` is
    a pickle, and unpickling a file from a stranger can run code. A folder with only ``.bin``
    weights is refused with a SourceError that says how to convert it.
    """
    transformers = require_transformers()
    _refuse_pickle_only(source)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    kwargs = {"trust_remote_code": False, "local_files_only": offline}
    # transformers' own "Loading weights" bar would break spectra's progress display; it is
    # switched off for this call only and put back as it was.
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.AutoModel.from_pretrained(str(source), use_safetensors=True, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError) as exc:
        raise SourceError(
            f"cannot load {source} with transformers for calibration: {exc}".splitlines()[0]
        ) from exc
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    model.to(resolve_device(device))
    model.eval()
    return model, tokenizer


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".tiktoken")


def _refuse_pickle_only(source: str | Path) -> None:
    folder = Path(source)
    if not folder.is_dir():
        return
    # transformers opens these itself: a FIFO or a device among them would hang or exhaust memory
    for entry in sorted(folder.iterdir()):
        if entry.suffix in _MODEL_FILE_SUFFIXES and not entry.is_dir():
            check_input(entry, "model file")
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise SourceError(
            f"{folder} has only pickled weights ({', '.join(pickles[:3])}), which spectra never "
            "unpickles: convert them to safetensors first, e.g. in a trusted environment "
            "AutoModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)"
        )


def resolve_modules(model: nn.Module, weight_names: Sequence[str]) -> dict[str, str]:
    """Map checkpoint weight names (``X.weight``) to module names in `model`.

    Tries ``X``, then ``X`` without the model's ``base_model_prefix`` (checkpoints of
    ``*ForCausalLM`` store ``model.layers...``, AutoModel has ``layers...``), then with it.
    Names that match no module with a 2-D weight are left out (the caller reports them).
    """
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "") or ""
    found: dict[str, str] = {}
    for name in weight_names:
        stem = name[: -len(".weight")] if name.endswith(".weight") else name
        candidates = [stem]
        if prefix and stem.startswith(prefix + "."):
            candidates.append(stem[len(prefix) + 1 :])
        if prefix:
            candidates.append(f"{prefix}.{stem}")
        for cand in candidates:
            weight = getattr(modules.get(cand), "weight", None)
            if isinstance(weight, torch.Tensor) and weight.ndim == 2:
                found[name] = cand
                break
    return found
