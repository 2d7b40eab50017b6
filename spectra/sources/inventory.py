"""What a checkpoint holds, as data: matrices and totals (what `spectra inspect` shows).

A quantized matrix's entry adds `storage` (scheme, bits, block) and `parts` (the stored tensors
it is decoded from); its `dtype` is its primary part's and `bytes` count every part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spectra.sources.checkpoint import Checkpoint
from spectra.sources.roles import ROLES, MatrixRef


@dataclass(frozen=True)
class RoleTotal:
    """Count, parameters and stored bytes of the matrices of one role."""

    role: str
    count: int
    parameters: int
    bytes: int


@dataclass(frozen=True)
class Inventory:
    """The selected matrices of a checkpoint with totals overall and by role (ROLES order)."""

    source: str
    tensors: int
    matrices: tuple[MatrixRef, ...]
    by_role: tuple[RoleTotal, ...]

    @property
    def parameters(self) -> int:
        return sum(m.numel for m in self.matrices)

    @property
    def bytes(self) -> int:
        return sum(m.nbytes for m in self.matrices)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: one entry per matrix, then totals."""
        return {
            "source": self.source,
            "tensors": self.tensors,
            "matrices": [_matrix_dict(m) for m in self.matrices],
            "totals": {
                "count": len(self.matrices),
                "parameters": self.parameters,
                "bytes": self.bytes,
                "by_role": {
                    t.role: {"count": t.count, "parameters": t.parameters, "bytes": t.bytes}
                    for t in self.by_role
                },
            },
        }


def _matrix_dict(m: MatrixRef) -> dict[str, Any]:
    out = _plain_dict(m)
    if m.encoded is not None:  # quantized / GGUF: how it is stored, and every stored part
        storage = m.encoded.codec.storage
        out["storage"] = {"scheme": storage.scheme, "bits": storage.bits, "block": storage.block}
        out["parts"] = [p.name for p in m.encoded.parts]
    return out


def _plain_dict(m: MatrixRef) -> dict[str, Any]:
    return {
        "key": m.key,
        "name": m.tensor.name,
        "role": m.role,
        "layer": m.layer,
        "shape": list(m.shape),
        "stored_shape": list(m.tensor.shape),
        "transpose": m.transpose,
        "expert": m.expert,
        "expert_role": m.expert_role,
        "dtype": m.tensor.dtype,
        "parameters": m.numel,
        "bytes": m.nbytes,
        "shard": m.tensor.shard.name,
    }


def inventory(
    ckpt: Checkpoint,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    roles: Sequence[str] = (),
) -> Inventory:
    """List the selected matrices of `ckpt` with totals (headers only, no tensor data)."""
    mats = tuple(ckpt.matrices(include=include, exclude=exclude, roles=roles))
    totals = []
    for role in ROLES:
        mine = [m for m in mats if m.role == role]
        if mine:
            totals.append(
                RoleTotal(role, len(mine), sum(m.numel for m in mine), sum(m.nbytes for m in mine))
            )
    return Inventory(ckpt.source, len(ckpt.tensors()), mats, tuple(totals))
