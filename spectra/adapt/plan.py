"""From user targets and ranks to a per-module plan: which matrices get an adapter, rank, alpha.

Targets (a comma list or a sequence) accept, per item:
- a role from the loaders (q k v o qkv up gate down gate_up expert shared_expert lm_head
  other; ``expert``: every routed MoE expert matrix);
- ``re:<regex>``: a regular expression searched in the module path;
- a glob (has ``*?[``) matched against the whole module path;
- any other word: a module path or its dotted suffix, as PEFT's ``target_modules`` does
  (``query`` matches ``encoder.layer.0.attention.self.query``).

The PEFT module path of tensor ``<path>.weight`` is ``<path>``. Plain 2-D ``.weight`` matrices
stored ``(out, in)`` carry a PEFT LoRA ``Linear`` adapter; routed MoE experts (per-expert 2-D
tensors and slices of 3-D stacks) are targeted through the 3-D parameters that hold them
(spectra.adapt.expert_targets). Embeddings, MoE routers and GPT-2 ``Conv1D`` (stored
transposed) are refused with a one-line reason.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from spectra.adapt.allocate import Allocation
from spectra.adapt.registry import Factors, InitContext, Initializer, check_factors
from spectra.errors import ValidationError
from spectra.formats.peft import lora_scale

TARGET_ROLES = (
    "q",
    "k",
    "v",
    "o",
    "qkv",
    "up",
    "gate",
    "down",
    "gate_up",
    "expert",
    "shared_expert",
    "lm_head",
    "other",
)
_GLOB_CHARS = re.compile(r"[*?\[]")


class MatrixLike(Protocol):
    """What the plan needs from a loader's ``MatrixRef`` (spectra.sources)."""

    key: str
    role: str
    layer: int | None
    shape: tuple[int, int]
    transpose: bool
    expert: int | None


@dataclass(frozen=True)
class ModulePlan:
    """One adapted matrix: key (tensor name), module (PEFT path), rank, alpha, scale."""

    key: str
    module: str
    role: str
    layer: int | None
    shape: tuple[int, int]
    rank: int
    alpha: float
    scale: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "module": self.module,
            "role": self.role,
            "layer": self.layer,
            "shape": list(self.shape),
            "rank": self.rank,
            "alpha": self.alpha,
            "scale": self.scale,
        }


@dataclass(frozen=True)
class AdapterPlan:
    """Every module that gets an adapter (rank >= 1), plus how the ranks were chosen."""

    method: str
    modules: tuple[ModulePlan, ...]
    rslora: bool
    targets: tuple[str, ...]
    allocation: Allocation | None = None

    @property
    def ranks(self) -> dict[str, int]:
        return {m.module: m.rank for m in self.modules}

    @property
    def alphas(self) -> dict[str, float]:
        return {m.module: m.alpha for m in self.modules}

    def by_key(self) -> dict[str, ModulePlan]:
        return {m.key: m for m in self.modules}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "rslora": self.rslora,
            "targets": list(self.targets),
            "allocation": None if self.allocation is None else self.allocation.to_dict(),
            "modules": [m.to_dict() for m in self.modules],
        }


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """``"q, k,,v"`` or ``["q", "k"]`` -> ``("q", "k", "v")``; empty is an error."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    parsed = tuple(t.strip() for t in items if t and t.strip())
    if not parsed:
        raise ValidationError("no targets given: pass e.g. --targets q,k,v,o,up,gate,down")
    return parsed


def module_path(key: str) -> str:
    """PEFT module path of a weight tensor: ``a.b.query.weight`` -> ``a.b.query``."""
    return key[: -len(".weight")] if key.endswith(".weight") else key


def _matches(item: str, mat: MatrixLike) -> bool:
    path = module_path(mat.key)
    if item in TARGET_ROLES:
        return mat.role == item
    if item.startswith("re:"):
        return re.search(item[3:], path) is not None
    if _GLOB_CHARS.search(item):
        return fnmatch.fnmatchcase(path, item)
    return path == item or path.endswith("." + item)


def lora_refusal(mat: MatrixLike) -> str | None:
    """Why ``mat`` cannot carry a PEFT LoRA adapter (None: it can). A routed expert can (one
    expert of a 3-D stack through PEFT's ``target_parameters``)."""
    if mat.role == "router":
        return (
            "is an MoE router (transformers holds its weight as a bare parameter of a router "
            "module, no nn.Linear for PEFT to wrap); not supported"
        )
    if mat.expert is not None and mat.role == "expert":
        return None
    if not mat.key.endswith(".weight"):
        return "is not a `.weight` tensor"
    if mat.transpose:
        return "is stored transposed (Conv1D); not supported for init yet"
    if mat.role == "embedding":
        return "is an embedding (PEFT uses lora_embedding_A/B there); not supported"
    return None


def select_targets(matrices: Sequence[MatrixLike], targets: str | Sequence[str]) -> list:
    """The matrices matched by any target item, in the given (shard) order.

    Raises ValidationError when an item is a bad regex, when nothing matches (the message lists
    the roles present and a few module paths), or when a matched matrix cannot carry a LoRA.
    """
    items = parse_targets(targets)
    for item in items:
        if item.startswith("re:"):
            try:
                re.compile(item[3:])
            except re.error as exc:
                raise ValidationError(f"bad target regex {item!r}: {exc}") from exc
    chosen = [m for m in matrices if any(_matches(item, m) for item in items)]
    if not chosen:
        roles = sorted({m.role for m in matrices})
        sample = [module_path(m.key) for m in matrices[:4]]
        raise ValidationError(
            f"no weight matrix matched targets {','.join(items)}: roles here are "
            f"{','.join(roles)}; module paths look like {', '.join(sample)}"
        )
    for mat in chosen:
        why = lora_refusal(mat)
        if why is not None:
            raise ValidationError(
                f"target {module_path(mat.key)!r} {why}: narrow --targets to exclude it"
            )
    return chosen


def keyed_by_weight(
    selected: Sequence[MatrixLike], values: Mapping[str, Any] | None, what: str
) -> dict[str, Any] | None:
    """Per-target values keyed by weight name or module path -> keyed by weight name.

    ``what`` names the values in the error for a key that is not a selected target.
    """
    if values is None:
        return None
    by_path = {m.key.removesuffix(".weight"): m.key for m in selected}
    keys = set(by_path.values())
    out: dict[str, Any] = {}
    for name, value in values.items():
        key = name if name in keys else by_path.get(name)
        if key is None:
            raise ValidationError(
                f"{what} names {name!r}, which is not one of the selected targets "
                f"(e.g. {', '.join(sorted(by_path)[:3])})"
            )
        out[key] = value
    return out


def build_plan(
    matrices: Sequence[MatrixLike],
    ranks: Mapping[str, int],
    *,
    method: str,
    targets: str | Sequence[str],
    alpha: float | None = None,
    alphas: Mapping[str, float] | None = None,
    rslora: bool = False,
    allocation: Allocation | None = None,
) -> AdapterPlan:
    """Plan for ``matrices`` already selected by ``select_targets``.

    ``ranks`` per matrix key (0 or missing = no adapter; a uniform rank is
    ``{m.key: r for m in matrices}``). ``alpha`` None gives each module ``alpha = r`` (scale 1,
    or sqrt(r) with rsLoRA), PiSSA's convention; a number is used for every module (PEFT's
    ``lora_alpha``). ``alphas`` (per matrix key) takes precedence for the modules it names (EVA's
    adjusted scaling factors). ``method``, ``targets`` and ``allocation`` are recorded.
    """
    if alpha is not None and not alpha > 0:
        raise ValidationError(f"alpha must be positive, got {alpha}")
    alphas = dict(alphas or {})
    for key, value in alphas.items():
        if not value > 0:
            raise ValidationError(f"alpha for {module_path(key)!r} must be positive, got {value}")
    mods = []
    for mat in matrices:
        r = int(ranks.get(mat.key, 0))
        if r < 0 or r > min(mat.shape):
            raise ValidationError(
                f"rank {r} for {module_path(mat.key)!r} exceeds min(m, n) = {min(mat.shape)} "
                f"of its shape {tuple(mat.shape)}: use a rank <= {min(mat.shape)}"
            )
        if r == 0:
            continue
        a = float(alphas.get(mat.key, r if alpha is None else alpha))
        mods.append(
            ModulePlan(
                key=mat.key,
                module=module_path(mat.key),
                role=mat.role,
                layer=mat.layer,
                shape=(int(mat.shape[0]), int(mat.shape[1])),
                rank=r,
                alpha=a,
                scale=lora_scale(a, r, rslora=rslora),
            )
        )
    if not mods:
        raise ValidationError("every target got rank 0: raise the budget or --min-rank")
    return AdapterPlan(method, tuple(mods), rslora, parse_targets(targets), allocation)


def factor_matrix(
    init: Initializer, W: Tensor, mp: ModulePlan, *, svd: str, seed: int, stats: Any = None
) -> Factors:
    """The method's checked factors ``A (r, n)``, ``B (m, r)`` for one planned matrix ``W (m, n)``
    (on W's device). The one place a plan's matrix is factorized, whichever process does it."""
    ctx = InitContext(
        key=mp.key, module=mp.module, svd=svd, seed=seed, device=W.device, stats=stats
    )
    f = init.init(W, mp.rank, mp.scale, ctx)
    check_factors(f, mp.shape, mp.rank, init.name)
    return f
