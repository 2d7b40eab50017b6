"""The initializer registry: a new method is one file with one class and one `register()` call.

An initializer turns one weight matrix ``W (m, n)`` (float32 or wider, on the work device), a rank
and the LoRA scale into factors ``A (r, n)``, ``B (m, r)``. It never computes the residual itself:
when ``mutates_base`` is true the caller subtracts ``scale * B @ A`` from W
(``spectra.adapt.factorize.residual``), so output preservation never depends on the accuracy of
the decomposition. Methods that need calibration data (CorDA covariances, EVA activation
components) read them from ``InitContext.stats``; ``B`` may be zero with the base unchanged (EVA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from spectra.errors import ValidationError

SvdMode = Literal["auto", "exact", "randomized"]
SVD_MODES: tuple[str, ...] = ("auto", "exact", "randomized")


@dataclass(frozen=True)
class InitContext:
    """What an initializer may know besides W: where it is, how to decompose, calibration stats.

    key: matrix key from the checkpoint; module: PEFT module path; svd: "exact" forces an exact
    SVD, "randomized" the randomized engine, "auto" lets the method pick (see pissa.py);
    seed: for randomized decompositions; stats: per-module calibration statistics (None unless
    the method declared ``needs_calibration``).
    """

    key: str
    module: str
    svd: SvdMode = "auto"
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stats: Any = None

    def __post_init__(self) -> None:
        if self.svd not in SVD_MODES:
            raise ValidationError(f"svd mode {self.svd!r} is not one of {', '.join(SVD_MODES)}")


@dataclass(frozen=True)
class Factors:
    """LoRA factors for one matrix: ``A (r, n)``, ``B (m, r)``; ``info`` is JSON-safe facts
    (decomposition used, accuracy estimate) that go into the manifest."""

    A: Tensor
    B: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@runtime_checkable
class Initializer(Protocol):
    """Interface every initializer implements (see module docstring)."""

    name: ClassVar[str]
    mutates_base: ClassVar[bool]
    needs_calibration: ClassVar[bool]
    description: ClassVar[str]

    def init(self, W: Tensor, rank: int, scale: float, ctx: InitContext) -> Factors:
        """``W (m, n)`` float, ``1 <= rank <= min(m, n)`` -> Factors."""
        ...


INITIALIZERS: dict[str, Initializer] = {}


def register_initializer(initializer: Initializer) -> Initializer:
    """Add an initializer instance under its ``name``; a second one with the same name is an
    error (names are what users type and what manifests record)."""
    name = initializer.name
    if name in INITIALIZERS and type(INITIALIZERS[name]) is not type(initializer):
        raise ValidationError(f"an initializer named {name!r} is already registered")
    INITIALIZERS[name] = initializer
    return initializer


def get_initializer(name: str) -> Initializer:
    """The registered initializer ``name`` (case-insensitive); the error lists the known ones."""
    load_builtins()
    found = INITIALIZERS.get(name.lower())
    if found is None:
        raise ValidationError(
            f"unknown method {name!r}: choose one of {', '.join(sorted(INITIALIZERS))}"
        )
    return found


def check_factors(factors: Factors, shape: tuple[int, int], rank: int, name: str) -> None:
    """Raise if an initializer returned factors of the wrong shape or with NaN/Inf."""
    m, n = shape
    if tuple(factors.A.shape) != (rank, n) or tuple(factors.B.shape) != (m, rank):
        raise ValidationError(
            f"initializer {name!r} returned A {tuple(factors.A.shape)}, "
            f"B {tuple(factors.B.shape)}; expected ({rank}, {n}) and ({m}, {rank})"
        )
    if not (torch.isfinite(factors.A).all() and torch.isfinite(factors.B).all()):
        raise ValidationError(f"initializer {name!r} produced NaN/Inf factors")


# Modules whose import registers built-in initializers/allocators (one file per method).
BUILTIN_MODULES: tuple[str, ...] = ("pissa", "milora", "olora", "corda", "eva", "lamda")


def load_builtins() -> None:
    """Import every built-in method module so its ``register_*`` calls have run (idempotent;
    local imports keep ``import spectra.adapt.registry`` free of cycles)."""
    import importlib

    for name in BUILTIN_MODULES:
        try:
            importlib.import_module(f"spectra.adapt.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"spectra.adapt.{name}":
                raise


def available_initializers() -> dict[str, str]:
    """{name: one-line description} of every registered initializer."""
    load_builtins()
    return {name: INITIALIZERS[name].description for name in sorted(INITIALIZERS)}
