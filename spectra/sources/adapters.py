"""PEFT LoRA adapters as low-rank factors: dW = scale * B @ A, never densified unless asked.

Keys follow PEFT: `base_model.model.<module>.lora_A[.<adapter>].weight` with A (r, in) and
B (out, r). The scale is `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA (Kalajdzievski
2023, arXiv 2312.03732); `rank_pattern` / `alpha_pattern` override r and alpha per module, matched
as PEFT does: the first pattern `p` for which `re.match(rf"(.*\\.)?({p})$", module)` succeeds.

An adapter "on top of its base" is a `MergedCheckpoint(base, adapter)`: it lists the base's matrices
and reads an adapted one as `W + scale * B @ A` (in the (out, in) presentation of the base).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spectra.device import resolve_device
from spectra.errors import SourceError
from spectra.formats.safetensors import TensorRef, clip
from spectra.sources.adapter_config import validate_adapter_config
from spectra.sources.checkpoint import Checkpoint
from spectra.sources.roles import MatrixRef

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$"
)


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: factors A (rank, in) and B (out, rank) and dW = scale * B @ A."""

    module: str
    base_key: str
    a: TensorRef
    b: TensorRef
    rank: int
    alpha: float
    scale: float
    use_rslora: bool


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: the value of the first key matching the end of `module`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scale(alpha: float, rank: int, *, use_rslora: bool) -> float:
    """alpha / r (LoRA), or alpha / sqrt(r) (rsLoRA)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoraAdapter:
    """A PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`)."""

    def __init__(self, checkpoint: Checkpoint, config: dict[str, Any]) -> None:
        self.checkpoint = checkpoint
        self.config = validate_adapter_config(config, f"{checkpoint.source}: adapter_config.json")
        self.modules: dict[str, LoraModule] = _modules(checkpoint, config)

    @classmethod
    def open(cls, path: str | Path) -> LoraAdapter:
        """Open an adapter folder; the error says what is missing."""
        folder = Path(path).expanduser()
        cfg_path = folder / "adapter_config.json"
        if not cfg_path.is_file():
            raise SourceError(f"{folder}: no adapter_config.json, not a PEFT adapter folder")
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(f"{cfg_path}: cannot read adapter config ({exc})") from exc
        except (ValueError, RecursionError) as exc:  # a number too long, nesting too deep
            raise SourceError(
                f"{cfg_path}: invalid adapter config JSON ({type(exc).__name__})"
            ) from exc
        if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise SourceError(f"{cfg_path}: not a LoRA adapter (peft_type must be LORA)")
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise SourceError(
                f"{folder}: no adapter_model.safetensors (a pickled adapter_model.bin is refused; "
                "save the adapter with safe_serialization=True)"
            )
        return cls(Checkpoint.from_files(str(folder), [weights]), config)

    def read_factors(
        self,
        module: str | LoraModule,
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A (rank, in), B (out, rank), scale) of `module` (a module path or a base key)."""
        mod = self._module(module)
        a = self.checkpoint.read(mod.a, dtype=dtype, device=device)
        b = self.checkpoint.read(mod.b, dtype=dtype, device=device)
        return a, b, mod.scale

    def delta(
        self, module: str | LoraModule, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> torch.Tensor:
        """Densified dW = scale * B @ A, (out, in). Only when asked."""
        a, b, scale = self.read_factors(module, dtype=dtype, device=device)
        return scale * (b @ a)

    def by_base_key(self) -> dict[str, LoraModule]:
        return {m.base_key: m for m in self.modules.values()}

    def close(self) -> None:
        self.checkpoint.close()

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _module(self, module: str | LoraModule) -> LoraModule:
        if isinstance(module, LoraModule):
            return module
        found = self.modules.get(module) or self.by_base_key().get(module)
        if found is None:
            raise SourceError(f"{self.checkpoint.source}: no LoRA module {clip(module)}")
        return found


def _modules(ckpt: Checkpoint, config: dict[str, Any]) -> dict[str, LoraModule]:
    pairs: dict[str, dict[str, TensorRef]] = {}
    for ref in ckpt.tensors():
        match = _KEY.match(ref.name)
        if match is None:
            continue
        pairs.setdefault(match["module"], {})[match["ab"]] = ref
    if not pairs:
        raise SourceError(f"{ckpt.source}: no lora_A/lora_B tensors in adapter_model.safetensors")
    rslora = bool(config.get("use_rslora", False))
    out = {}
    for module, ab in pairs.items():
        out[module] = _module(ckpt.source, module, ab, config, rslora)
    return out


def _module(
    source: str, module: str, ab: dict[str, TensorRef], config: dict[str, Any], rslora: bool
) -> LoraModule:
    if set(ab) != {"A", "B"}:
        raise SourceError(f"{source}: module {clip(module)} has lora_{set(ab).pop()} but not both")
    a, b = ab["A"], ab["B"]
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        raise SourceError(
            f"{source}: module {clip(module)}: A {clip(list(a.shape))} and B {clip(list(b.shape))} "
            "are not "
            "(r, in) and (out, r) (only linear LoRA is supported)"
        )
    rank = a.shape[0]
    if rank < 1:
        raise SourceError(f"{source}: module {clip(module)} has rank 0 (empty lora_A)")
    expected = int(pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank)))
    if expected != rank:
        raise SourceError(
            f"{source}: module {clip(module)} has rank {rank} but the config says {expected}"
        )
    alpha = float(
        pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
    )
    scale = lora_scale(alpha, rank, use_rslora=rslora)
    return LoraModule(module, f"{module}.weight", a, b, rank, alpha, scale, rslora)


class MergedCheckpoint:
    """A base checkpoint with a LoRA adapter applied: adapted matrices read as W + s * B @ A.

    Same listing and reading interface as `Checkpoint` (matrices, read, read_many, content_key);
    every adapter module must name a 2-D matrix of the base with the matching (out, in) shape.
    """

    def __init__(self, base: Checkpoint, adapter: LoraAdapter) -> None:
        self.base, self.adapter = base, adapter
        self.source = f"{base.source} + {adapter.checkpoint.source}"
        self.files, self.metadata = base.files, base.metadata
        self._lora = adapter.by_base_key()
        by_key = {m.key: m for m in base.matrices()}
        for key, mod in self._lora.items():
            m = by_key.get(key)
            if m is None:
                raise SourceError(
                    f"{self.source}: adapter module {clip(mod.module)} has no base {clip(key)}"
                )
            if m.shape != (mod.b.shape[0], mod.a.shape[1]):
                raise SourceError(
                    f"{self.source}: {clip(key)} is {m.shape} in the base but the adapter's "
                    "B @ A is "
                    f"({mod.b.shape[0]}, {mod.a.shape[1]}): wrong base model?"
                )

    def tensors(self) -> list[TensorRef]:
        return self.base.tensors()

    def matrices(
        self, include: Sequence[str] = (), exclude: Sequence[str] = (), roles: Sequence[str] = ()
    ) -> list[MatrixRef]:
        return self.base.matrices(include=include, exclude=exclude, roles=roles)

    def read(
        self, ref: MatrixRef | str, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> torch.Tensor:
        w = self.base.read(ref, dtype=dtype, device=device)
        key = ref if isinstance(ref, str) else ref.key
        return self._apply(key, w, dtype, device)

    def read_many(
        self,
        refs: Iterable[MatrixRef],
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ) -> Iterator[tuple[MatrixRef, torch.Tensor]]:
        for ref, w in self.base.read_many(refs, dtype=dtype, device=device):
            yield (
                ref,
                self._apply(ref.key if isinstance(ref, MatrixRef) else ref.name, w, dtype, device),
            )  # type: ignore[misc]

    def content_key(self, ref: MatrixRef | str) -> str:
        key = ref if isinstance(ref, str) else ref.key
        base = self.base.content_key(ref)
        mod = self._lora.get(key)
        if mod is None:
            return base
        ck = self.adapter.checkpoint.content_key
        return f"{base}+lora({ck(mod.a)},{ck(mod.b)},{mod.scale!r})"

    def close(self) -> None:
        self.base.close()
        self.adapter.close()

    def __enter__(self) -> MergedCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _apply(self, key: str, w: torch.Tensor, dtype: torch.dtype, device: str) -> torch.Tensor:
        mod = self._lora.get(key)
        if mod is None:
            return w
        a, b, scale = self.adapter.read_factors(
            mod, dtype=dtype, device=str(resolve_device(device))
        )
        return w.addmm_(b, a, alpha=scale)
