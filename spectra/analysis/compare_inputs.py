"""What `compare` reads besides the two checkpoints' matrices: whether FINETUNED is a PEFT
adapter folder (and whether that adapter was trained on a residual base, which makes BASE +
adapter the wrong fine-tuned model), and the base's left singular vectors from the spectrum cache.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from spectra.analysis.drift import left_singular
from spectra.linalg.cache import SpectrumCache
from spectra.linalg.engine import matrix_content_key
from spectra.linalg.spectrum import Spectrum
from spectra.sources.adapters import LoraAdapter
from spectra.sources.checkpoint import Checkpoint
from spectra.sources.roles import MatrixRef


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
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(recorded, dict):
        return None
    method = recorded.get("method")
    # `spectra init` writes residual_base/ next to spectra.json exactly when the method changed
    # the base (PiSSA, MiLoRA, OLoRA, CorDA, LaMDA++), so no knowledge of the methods is needed.
    if recorded.get("kind") == "init" and (path.parent / "residual_base").is_dir():
        return str(method)
    return None


# U from the float64 Gram eigenvectors (drift.left_singular); entries stored by the earlier
# full-SVD route (mode "compare-base-svd") are not reused, so cached and fresh runs agree bit
# for bit.
BASE_SVD_PARAMS = {"mode": "compare-base-gram", "dtype": "float64", "full_u": True}


def base_svd(
    ckpt: Checkpoint, ref: MatrixRef, w0: torch.Tensor, cache: SpectrumCache | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(U (m, M), S (M,)) of the base matrix from the cache, computing and storing it on a miss;
    None without a cache (compare_pair then computes it). Keyed by the matrix's content."""
    if cache is None:
        return None
    key = cache.entry_key(matrix_content_key(ckpt, ref, cache), BASE_SVD_PARAMS)
    hit = cache.get(key)
    if hit is not None and hit.U is not None and hit.U.dtype == w0.dtype:
        return hit.U.to(w0.device), hit.values.to(device=w0.device, dtype=w0.dtype)
    u, s = left_singular(w0)
    spec = Spectrum(
        values=s.cpu().to(torch.float64),
        U=u.cpu(),
        Vh=None,
        method="gram64",
        params=dict(BASE_SVD_PARAMS),
        shape=(int(w0.shape[0]), int(w0.shape[1])),
    )
    cache.put(key, spec)
    return u, s
