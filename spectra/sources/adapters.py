"""PEFT LoRA adapters as low-rank factors: dW = scale * B @ A, never densified unless asked.

The folder is read and checked by `spectra.formats.peft` (PEFT's keys, defaults, rank/alpha
patterns and scale rule); here its factors stay on disk behind a `Checkpoint` and are read one
module at a time. A is (r, in), B is (out, r).

An adapter "on top of its base" is a `MergedCheckpoint(base, adapter)`: it lists the base's matrices
and reads an adapted one as `W + scale * B @ A` (in the (out, in) presentation of the base).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spectra.device import resolve_device
from spectra.errors import SourceError
from spectra.formats.peft import (
    CONFIG_NAME,
    LoraSettings,
    adapter_files,
    lora_modules,
    read_adapter_config,
)
from spectra.formats.safetensors import TensorRef, clip
from spectra.sources.checkpoint import Checkpoint
from spectra.sources.roles import MatrixRef


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


class LoraAdapter:
    """A PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`).

    With `initial` (the adapter it was trained from, on a residual base ``W_res = W - s B0 A0``:
    PiSSA, MiLoRA, OLoRA, CorDA) it reads as the update on the ORIGINAL base,
    ``s (B A - B0 A0)``: factors ``[A; A0]`` and ``[B, -B0]`` of rank 2r with the same scale
    (docs/methods.md section 4, what `spectra convert` writes).
    """

    def __init__(
        self, checkpoint: Checkpoint, config: dict[str, Any], initial: LoraAdapter | None = None
    ) -> None:
        self.checkpoint = checkpoint
        self.config = config
        self.settings = LoraSettings.from_config(config, f"{checkpoint.source}: {CONFIG_NAME}")
        self.modules: dict[str, LoraModule] = _modules(checkpoint, self.settings)
        self.initial = initial
        if initial is not None:
            _check_trained_from(self, initial)

    @classmethod
    def open(cls, path: str | Path, *, initial: str | Path | None = None) -> LoraAdapter:
        """Open an adapter folder; the error says what is missing. `initial`: the folder of the
        adapter it was trained from on a residual base (see the class docstring)."""
        config = read_adapter_config(path)
        _, weights = adapter_files(path)
        first = None if initial is None else cls.open(initial)
        return cls(Checkpoint.from_files(str(weights.parent), [weights]), config, first)

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
        if self.initial is not None:
            a0, b0, _ = self.initial.read_factors(mod.module, dtype=dtype, device=device)
            a, b = torch.cat([a, a0], dim=0), torch.cat([b, -b0], dim=1)
        return a, b, mod.scale

    def delta(
        self, module: str | LoraModule, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> torch.Tensor:
        """Densified dW = scale * B @ A, (out, in). Only when asked."""
        a, b, scale = self.read_factors(module, dtype=dtype, device=device)
        return scale * (b @ a)

    def by_base_key(self) -> dict[str, LoraModule]:
        return {m.base_key: m for m in self.modules.values()}

    def content_key(self, mod: LoraModule) -> str:
        """What the module's factors are made of, for cache keys."""
        ck = self.checkpoint.content_key
        own = f"{ck(mod.a)},{ck(mod.b)}"
        if self.initial is None:
            return own
        first = self.initial.modules[mod.module]
        return f"{own}-{self.initial.content_key(first)}"

    def close(self) -> None:
        self.checkpoint.close()
        if self.initial is not None:
            self.initial.close()

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


def _check_trained_from(trained: LoraAdapter, initial: LoraAdapter) -> None:
    """The trained adapter must have the initial one's modules, factor shapes and scales."""
    where = f"{trained.checkpoint.source} (trained from {initial.checkpoint.source})"
    if set(trained.modules) != set(initial.modules):
        only = sorted(set(trained.modules) ^ set(initial.modules))
        raise SourceError(
            f"{where}: the adapters target different modules (e.g. {clip(only[0])}): "
            "was it trained from this init?"
        )
    for name, mod in trained.modules.items():
        first = initial.modules[name]
        same_shape = (mod.a.shape, mod.b.shape) == (first.a.shape, first.b.shape)
        if not same_shape or not math.isclose(mod.scale, first.scale, rel_tol=1e-6):
            raise SourceError(
                f"{where}: module {clip(name)} has A {mod.a.shape}, B {mod.b.shape}, scale "
                f"{mod.scale} but the initial adapter A {first.a.shape}, B {first.b.shape}, "
                f"scale {first.scale}: was it trained from this init?"
            )


def _modules(ckpt: Checkpoint, settings: LoraSettings) -> dict[str, LoraModule]:
    refs = {ref.name: ref for ref in ckpt.tensors()}
    keys = lora_modules({name: ref.shape for name, ref in refs.items()}, settings, ckpt.source)
    return {
        module: LoraModule(
            module=module,
            base_key=f"{module}.weight",
            a=refs[k.a],
            b=refs[k.b],
            rank=k.rank,
            alpha=settings.alpha(module),
            scale=settings.scale(module),
            use_rslora=settings.use_rslora,
        )
        for module, k in keys.items()
    }


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

    def read_groups(self, refs: Sequence[MatrixRef | TensorRef]) -> list[list[int]]:
        return self.base.read_groups(refs)

    def content_key(self, ref: MatrixRef | str) -> str:
        key = ref if isinstance(ref, str) else ref.key
        base = self.base.content_key(ref)
        mod = self._lora.get(key)
        if mod is None:
            return base
        return f"{base}+lora({self.adapter.content_key(mod)},{mod.scale!r})"

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
