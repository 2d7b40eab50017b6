"""spectra.sources: what to read. Safetensors checkpoints listed from headers, read on demand.

Public API: `Checkpoint`, `TensorRef`, `MatrixRef`, `ROLES`, `shard_digest`, `bundled_model_path`,
`IndexMismatchWarning` (shards hold tensors their index does not list);
LoRA adapters in `spectra.sources.adapters`; Hub access in `spectra.sources.hub`.
"""

from __future__ import annotations

from spectra.formats.safetensors import DTYPES, TensorRef
from spectra.sources.bundled import bundled_model_path
from spectra.sources.checkpoint import Checkpoint
from spectra.sources.layout import IndexMismatchWarning
from spectra.sources.reader import shard_digest
from spectra.sources.roles import ROLES, MatrixRef

__all__ = [
    "DTYPES",
    "ROLES",
    "Checkpoint",
    "IndexMismatchWarning",
    "MatrixRef",
    "TensorRef",
    "bundled_model_path",
    "shard_digest",
]
