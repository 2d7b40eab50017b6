"""PEFT LoRA adapter folders: the one reader and the one writer, with PEFT's own rules.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (docs/methods.md
section 6) with ``base_model.model.<module>.lora_A[.<adapter>].weight`` A ``(r, in)`` and
``...lora_B...`` B ``(out, r)``; the update is ``dW = scale * B @ A``.

The rules are PEFT's (``peft.LoraConfig``, ``LoraModel._create_and_replace``,
``peft.utils.other.get_pattern_key``), so spectra reads an adapter as PEFT loads it:

- defaults for absent fields are ``LoraConfig``'s: ``r`` 8, ``lora_alpha`` 8, ``use_rslora``
  false (``DEFAULT_R``, ``DEFAULT_LORA_ALPHA``);
- a module's rank and alpha come from ``rank_pattern`` / ``alpha_pattern``: the first key ``k``
  with ``re.match(rf"(.*\\.)?({k})$", module)``, else the module path itself as the key, else the
  global ``r`` / ``lora_alpha`` (``pattern_key``, ``pattern_value``);
- ``scale = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023,
  arXiv 2312.03732) (``lora_scale``).

Reading: adapter folders come from strangers, so every field used is type-checked (one
``SourceError`` naming the field and the value, never a ``TypeError`` deep inside), pattern keys
must compile and may not repeat a group that itself repeats or alternates (``(a+)+``, ``(a|a)*``:
exponential backtracking on a crafted module name), and every module's A and B must form a LoRA
of the rank the config gives it. ``lora_modules`` does that check on names and shapes alone, so the
lazy factor view (``spectra.sources.adapters``) and the eager ``read_peft_adapter`` share it.

Writing: ``init_lora_weights`` is always ``true`` ("pissa"/"olora"/"corda" would make PEFT redo its
own decomposition on load and overwrite the stored factors). ``target_modules``, ``rank_pattern``
and ``alpha_pattern`` list every adapted module by its full path; a key that would also match
another module is anchored and escaped (``pattern_keys``), and the written config is read back
with the rules above before anything is saved.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from spectra.device import require_host_memory
from spectra.errors import SourceError, ValidationError
from spectra.formats.files import MAX_JSON_BYTES, check_input, read_json_input
from spectra.formats.safetensors import clip, read_header

try:  # Python >= 3.11
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: PEFT's ``LoraConfig`` defaults for a config that leaves the field out.
DEFAULT_R = 8
DEFAULT_LORA_ALPHA = 8
#: Largest |lora_alpha| read or written: real ones are below a few thousand, and a scale near
#: float's range overflows the update s * B @ A (1e308 did, and in `convert` its doubling).
MAX_LORA_ALPHA = 1e6
#: Largest rank: torch sizes are int64 (and sqrt() of an int past 1e308 overflows).
MAX_LORA_RANK = 2**63 - 1
MAX_PATTERN_CHARS = 1000
#: The regex policy for patterns read from a file (``check_pattern``, ``check_match_cost``).
MAX_PATTERN_REPEATS = 2
MATCH_BUDGET = 2 * 10**9
#: Longest module path an adapter may name (real ones are under 200 characters).
MAX_MODULE_CHARS = 1000

_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$"
)
_REPEATS = {
    getattr(_sre_parse, n)
    for n in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
    if hasattr(_sre_parse, n)
}
_BRANCH = _sre_parse.BRANCH
_BACKREFS = {_sre_parse.GROUPREF, _sre_parse.GROUPREF_EXISTS}
V = TypeVar("V")


# --- PEFT's rules -------------------------------------------------------------------------------


def lora_scale(alpha: float, rank: int, *, rslora: bool = False) -> float:
    """The factor PEFT multiplies ``B @ A`` by: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA.

    Any finite alpha is PEFT's (alpha 0 is a zero update); initializers refuse a scale <= 0
    themselves (``spectra.adapt.factorize.factorize``).

    >>> lora_scale(16, 16), lora_scale(8, 4, rslora=True)
    (1.0, 4.0)
    """
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
        raise ValidationError(f"LoRA rank must be a positive integer, got {clip(rank)}")
    if not -MAX_LORA_ALPHA <= alpha <= MAX_LORA_ALPHA:  # NaN fails too
        raise ValidationError(
            f"LoRA alpha must be a finite number between -{MAX_LORA_ALPHA:g} and "
            f"{MAX_LORA_ALPHA:g}, got {clip(alpha)}"
        )
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def pattern_key(keys: Iterable[str], module: str) -> str:
    """PEFT's ``get_pattern_key``: the first key ``k`` for which ``re.match(rf"(.*\\.)?({k})$",
    module)`` succeeds (a regex matched against whole dotted components at the end of the path),
    else ``module`` itself. The keys must have passed ``check_pattern``; their estimated cost
    against this module is bounded first (``check_match_cost``)."""
    keys = list(keys)
    check_match_cost(keys, [module], "pattern keys")
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def pattern_value(patterns: Mapping[str, V], module: str, default: V) -> V:
    """The per-module override of ``rank_pattern`` / ``alpha_pattern`` as PEFT resolves it."""
    return patterns.get(pattern_key(patterns, module), default)


def pattern_keys(modules: Sequence[str]) -> dict[str, str]:
    """Map each module path to a pattern key that resolves to it and to no other module in
    ``modules`` under PEFT's rule: the plain path where that already holds, else ``^`` +
    ``re.escape`` of it (``^`` inside PEFT's group only matches at the start, so no prefix can
    sneak in)."""
    out = {}
    for module in modules:
        key = module
        if _clashes(key, module, modules):
            key = "^" + re.escape(module)
            if _clashes(key, module, modules):  # pragma: no cover - cannot happen for paths
                raise ValidationError(f"module path {module!r} cannot be told apart from others")
        out[module] = key
    return out


def _clashes(key: str, module: str, modules: Sequence[str]) -> bool:
    return any(o != module and re.match(rf"(.*\.)?({key})$", o) for o in modules)


def check_pattern(pattern: str, what: str) -> None:
    """The one policy for a regular expression read from a file (``rank_pattern`` and
    ``alpha_pattern`` keys): it must compile, be at most ``MAX_PATTERN_CHARS`` long, hold no
    backreference or conditional group, repeat no group that itself repeats or alternates
    (``(a+)+``, ``(a|b)*``: exponential backtracking), and hold at most
    ``MAX_PATTERN_REPEATS`` repeats overall (``.*.*.*X``: polynomial backtracking of high degree).
    PEFT's usual keys (paths, ``.*\\.q_proj``, ``^model\\.layers\\.(0|1)\\..*``) pass; what
    remains is bounded by ``check_match_cost``."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise SourceError(f"{what}: pattern longer than {MAX_PATTERN_CHARS} characters")
    try:
        parsed = _sre_parse.parse(pattern)
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise SourceError(f"{what}: not a valid regular expression ({clip(exc)})") from exc
    if _has_backref(parsed):
        raise SourceError(
            f"{what}: backreferences and conditional groups are not accepted in module "
            "patterns; write the module path, or a pattern with at most a few .* wildcards"
        )
    if _nested_repeat(parsed, inside_repeat=False):
        raise SourceError(
            f"{what}: a repeated group that itself repeats or alternates (like (a+)+ or (a|b)*) "
            "can take exponential time; write the module path, or a single .* wildcard"
        )
    repeats = pattern_repeats(pattern)
    if repeats > MAX_PATTERN_REPEATS:
        raise SourceError(
            f"{what}: {repeats} repeats (*, +, {{m,n}}); at most {MAX_PATTERN_REPEATS} are "
            "accepted, since each one multiplies the matching time by the module path's length; "
            "write the module path, or fewer .* wildcards"
        )


def pattern_repeats(pattern: str) -> int:
    """How many repeats that can take more than one character (``*``, ``+``, ``{m,n}`` with
    n > 1) the pattern holds, nested ones included; 0 for a plain path."""
    return _cached_repeats(pattern)


def match_cost(key: str, module: str) -> int:
    """An upper estimate of the backtracking steps of PEFT's ``re.match(rf"(.*\\.)?({key})$",
    module)``: ``(len(module) + 1) ** (repeats + 1)`` (PEFT's own ``.*`` is one more repeat)."""
    return (len(module) + 1) ** (pattern_repeats(key) + 1)


def check_match_cost(keys: Sequence[str], modules: Iterable[str], what: str) -> None:
    """Refuse matching ``keys`` against ``modules`` when the estimated steps exceed
    ``MATCH_BUDGET`` (about a second at worst): many wildcard keys against many long module
    paths. Keys without a repeat cost one pass over the path and are not counted."""
    costs = [(r, k) for k in keys if (r := pattern_repeats(k)) > 0]
    if not costs:
        return
    total = 0
    for module in modules:
        total += sum((len(module) + 1) ** (r + 1) for r, _ in costs)
        if total > MATCH_BUDGET:
            raise SourceError(
                f"{what}: matching {len(costs)} pattern keys against module paths like "
                f"{clip(module)} ({len(module)} characters) would take too long; use fewer "
                "wildcard keys (or the module paths themselves) and module paths of ordinary length"
            )


@functools.lru_cache(maxsize=4096)
def _cached_repeats(pattern: str) -> int:
    return _count_repeats(_sre_parse.parse(pattern))


def _subpatterns(av: Any) -> list[Any]:
    """The sub-patterns nested in one parsed item's argument (groups, branches, assertions)."""
    out: list[Any] = []
    for part in av if isinstance(av, (tuple, list)) else ():
        if isinstance(part, _sre_parse.SubPattern):
            out.append(part)
        elif isinstance(part, (tuple, list)):
            out.extend(_subpatterns(part))
    return out


def _count_repeats(items: Any) -> int:
    n = 0
    for op, av in items:
        if op in _REPEATS and av[1] > 1:
            n += 1
        n += sum(_count_repeats(sub) for sub in _subpatterns(av))
    return n


def _has_backref(items: Any) -> bool:
    for op, av in items:
        if op in _BACKREFS:
            return True
        if any(_has_backref(sub) for sub in _subpatterns(av)):
            return True
    return False


def _nested_repeat(items: Any, *, inside_repeat: bool) -> bool:
    for op, av in items:
        if op in _REPEATS:
            _, hi, sub = av
            unbounded = hi > 1
            if unbounded and inside_repeat:
                return True
            if _nested_repeat(sub, inside_repeat=inside_repeat or unbounded):
                return True
        elif op is _BRANCH:
            if inside_repeat:
                return True
            if any(_nested_repeat(b, inside_repeat=False) for b in av[1]):
                return True
        elif any(_nested_repeat(sub, inside_repeat=inside_repeat) for sub in _subpatterns(av)):
            return True
    return False


# --- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA fields of an ``adapter_config.json``, PEFT's defaults filled in.

    Build it with ``from_config``, which validates: ``r`` (int >= 1), ``lora_alpha`` (finite
    number), ``use_rslora`` (bool), ``rank_pattern`` ({regex: int >= 1}), ``alpha_pattern``
    ({regex: finite number}).
    """

    r: int = DEFAULT_R
    lora_alpha: float = DEFAULT_LORA_ALPHA
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: object, where: str) -> LoraSettings:
        """Validate the config object (absent fields get PEFT's defaults; present ones must have
        the right type) and keep its LoRA settings."""
        if not isinstance(config, dict):
            raise SourceError(
                f"{where}: adapter config must be a JSON object, got {type(config).__name__}"
            )
        if "r" in config:
            _positive_int(config["r"], f"{where}: r")
        if "lora_alpha" in config:
            _finite_number(config["lora_alpha"], f"{where}: lora_alpha")
        if config.get("use_dora") not in (False, None):
            raise SourceError(
                f"{where}: use_dora is {clip(config['use_dora'])}: a DoRA adapter's update is not "
                "scale * B @ A (a magnitude vector rescales the merged columns); merge it into "
                "the base with PEFT (merge_and_unload) and compare the merged model"
            )
        if "use_rslora" in config and not isinstance(config["use_rslora"], bool):
            raise SourceError(
                f"{where}: use_rslora must be true or false, got {clip(config['use_rslora'])}"
            )
        patterns = {
            name: _patterns(config.get(name), name, check, where)
            for name, check in (("rank_pattern", _positive_int), ("alpha_pattern", _finite_number))
        }
        return cls(
            r=config.get("r", DEFAULT_R),
            lora_alpha=config.get("lora_alpha", DEFAULT_LORA_ALPHA),
            use_rslora=config.get("use_rslora", False),
            **patterns,
        )

    def rank(self, module: str) -> int:
        """The module's r: its ``rank_pattern`` entry, else the global ``r``."""
        return int(pattern_value(self.rank_pattern, module, self.r))

    def alpha(self, module: str) -> float:
        """The module's lora_alpha: its ``alpha_pattern`` entry, else the global ``lora_alpha``."""
        return float(pattern_value(self.alpha_pattern, module, self.lora_alpha))

    def scale(self, module: str) -> float:
        """The factor PEFT multiplies the module's ``B @ A`` by."""
        return lora_scale(self.alpha(module), self.rank(module), rslora=self.use_rslora)


def _patterns(
    value: object, name: str, check: Callable[[Any, str], None], where: str
) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SourceError(f"{where}: {name} must map module patterns to values, got {clip(value)}")
    for key, item in value.items():
        check_pattern(key, f"{where}: {name} key {clip(key)}")
        check(item, f"{where}: {name}[{clip(key)}]")
    return dict(value)


def _positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LORA_RANK:
        raise SourceError(
            f"{what} must be a positive integer up to {MAX_LORA_RANK}, got {clip(value)}"
        )


def _finite_number(value: Any, what: str) -> None:
    # compared before any float conversion: math.isfinite(10**400) raises OverflowError, and
    # an alpha of 1e308 overflows the update (and PEFT's doubled alpha in `convert`) to inf
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not -MAX_LORA_ALPHA <= value <= MAX_LORA_ALPHA:
        raise SourceError(
            f"{what} must be a finite number between -{MAX_LORA_ALPHA:g} and "
            f"{MAX_LORA_ALPHA:g}, got {clip(value)}"
        )


def adapter_files(path: str | Path) -> tuple[Path, Path]:
    """(config, weights) paths of an adapter folder; the error says what is missing."""
    folder = Path(path).expanduser()
    config, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    # exists(), not is_file(): a FIFO or device in their place is refused when read
    if not config.exists():
        raise SourceError(f"{folder}: no {CONFIG_NAME}, not a PEFT adapter folder")
    if not weights.exists():
        raise SourceError(
            f"{folder}: no {WEIGHTS_NAME} (a pickled adapter_model.bin is refused; "
            "save the adapter with safe_serialization=True), not a PEFT adapter folder"
        )
    return config, weights


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` object of a LoRA adapter folder (its LoRA fields are checked
    by ``LoraSettings.from_config``)."""
    cfg_path, _ = adapter_files(path)
    config = read_json_input(cfg_path, "adapter config", MAX_JSON_BYTES)
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise SourceError(f"{cfg_path}: not a LoRA adapter (peft_type must be LORA)")
    params = config.get("target_parameters")
    if params:
        shown = clip(", ".join(map(str, params)) if isinstance(params, list) else params)
        raise SourceError(
            f"{cfg_path}: the adapter targets 3-D parameters (target_parameters: {shown}), MoE "
            "experts PEFT adapts with its ParamWrapper; spectra reads LoRA adapters of "
            "nn.Linear modules only: merge it with PEFT (merge_and_unload) and compare the "
            "merged model"
        )
    return config


@dataclass(frozen=True)
class LoraKeys:
    """Where one module's factors are: tensor names of A ``(rank, in)`` and B ``(out, rank)``."""

    module: str
    a: str
    b: str
    rank: int


def lora_modules(
    shapes: Mapping[str, Sequence[int]], settings: LoraSettings, where: str
) -> dict[str, LoraKeys]:
    """The LoRA modules among tensors ``{name: shape}``, each checked: both factors present,
    2-D, ``A (r, in)`` and ``B (out, r)``, and ``r`` the rank the config gives the module.
    Other tensors (``modules_to_save``, biases) are not modules."""
    _refuse_unrepresentable(shapes, where)
    pairs: dict[str, dict[str, str]] = {}
    adapters: dict[str | None, str] = {}
    for name in shapes:
        match = _LORA_KEY.match(name)
        if match is None:
            continue
        if len(match["module"]) > MAX_MODULE_CHARS:
            raise SourceError(
                f"{where}: module path {clip(match['module'])} is longer than "
                f"{MAX_MODULE_CHARS} characters"
            )
        adapters.setdefault(match["adapter"], name)
        half = pairs.setdefault(match["module"], {})
        if match["ab"] in half:
            raise SourceError(
                f"{where}: module {clip(match['module'])} has two lora_{match['ab']} tensors "
                f"({clip(half[match['ab']])} and {clip(name)})"
            )
        half[match["ab"]] = name
    if len(adapters) > 1:
        (n1, t1), (n2, t2) = list(adapters.items())[:2]
        raise SourceError(
            f"{where}: the file holds more than one adapter ({clip(n1 or 'unnamed')} in "
            f"{clip(t1)} and {clip(n2 or 'unnamed')} in {clip(t2)}); save each adapter to its "
            "own folder (PeftModel.save_pretrained(..., selected_adapters=[name]))"
        )
    if not pairs:
        raise SourceError(f"{where}: no lora_A/lora_B tensors in {WEIGHTS_NAME}")
    keys = [*settings.rank_pattern, *settings.alpha_pattern]
    check_match_cost(keys, pairs, f"{where}: rank_pattern/alpha_pattern")
    return {module: _lora_keys(module, ab, shapes, settings, where) for module, ab in pairs.items()}


# PEFT tensors of LoRA variants that spectra cannot read as dW = scale * B @ A (a DoRA magnitude
# rescales the merged columns; embedding factors are transposed); refused, never dropped.
_UNREPRESENTABLE = {
    "lora_magnitude_vector": "a DoRA adapter (lora_magnitude_vector): its update is not "
    "scale * B @ A; merge it into the base with PEFT (merge_and_unload) and compare the merged "
    "model",
    "lora_embedding_A": "embedding LoRA factors (lora_embedding_A/B) are not supported; remove "
    "the embedding layer from target_modules, or merge it with PEFT and compare the merged model",
    "lora_embedding_B": "embedding LoRA factors (lora_embedding_A/B) are not supported; remove "
    "the embedding layer from target_modules, or merge it with PEFT and compare the merged model",
}


def is_adapter_tensor(name: str) -> bool:
    """Whether a tensor name is a PEFT LoRA factor (``lora_A``/``lora_B``, embedding factors,
    a DoRA magnitude), not a weight of the model."""
    return _LORA_KEY.match(name) is not None or any(f".{p}" in name for p in _UNREPRESENTABLE)


def _refuse_unrepresentable(shapes: Mapping[str, Sequence[int]], where: str) -> None:
    for name in shapes:
        for part, why in _UNREPRESENTABLE.items():
            if f".{part}" in name:
                raise SourceError(f"{where}: tensor {clip(name)}: {why}")


def _lora_keys(
    module: str,
    ab: dict[str, str],
    shapes: Mapping[str, Sequence[int]],
    settings: LoraSettings,
    where: str,
) -> LoraKeys:
    if set(ab) != {"A", "B"}:
        raise SourceError(f"{where}: module {clip(module)} has lora_{set(ab).pop()} but not both")
    a, b = list(shapes[ab["A"]]), list(shapes[ab["B"]])
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        raise SourceError(
            f"{where}: module {clip(module)}: A {clip(a)} and B {clip(b)} are not "
            "(r, in) and (out, r) (only linear LoRA is supported)"
        )
    rank = int(a[0])
    if rank < 1:
        raise SourceError(f"{where}: module {clip(module)} has rank 0 (empty lora_A)")
    expected = settings.rank(module)
    if expected != rank:
        raise SourceError(
            f"{where}: module {clip(module)} has rank {rank} but the config says {expected}"
        )
    return LoraKeys(module, ab["A"], ab["B"], rank)


@dataclass(frozen=True)
class PeftAdapter:
    """A LoRA adapter read into memory: ``factors[module] = (A (r, in), B (out, r))``;
    ``config`` the ``adapter_config.json`` object, ``settings`` its validated LoRA fields;
    ``other``: the file's further tensors, kept as they are (e.g. modules_to_save)."""

    config: dict[str, Any]
    settings: LoraSettings
    factors: dict[str, tuple[Tensor, Tensor]]
    other: dict[str, Tensor] = field(default_factory=dict)

    def rank(self, module: str) -> int:
        return self.settings.rank(module)

    def alpha(self, module: str) -> float:
        return self.settings.alpha(module)

    def scale(self, module: str) -> float:
        return self.settings.scale(module)


def read_peft_adapter(path: str | Path) -> PeftAdapter:
    """Read a PEFT LoRA adapter folder (ours or one PEFT saved after training), validated: the
    weights' header goes through the one safetensors validator (``read_header``) first, so a
    garbage or truncated file is a one-line ``SourceError`` like everywhere else."""
    config = read_adapter_config(path)
    _, w_path = adapter_files(path)
    settings = LoraSettings.from_config(config, f"{path}: {CONFIG_NAME}")
    check_input(w_path, "adapter weights")
    # the header (read through the one input opener) says what get_tensor will allocate
    header = read_header(w_path)
    claimed = sum(ref.nbytes for ref in header.tensors)
    require_host_memory(
        3 * claimed,  # the tensors, their converted copies and the writer's buffer
        f"{w_path}: an adapter whose tensors hold {claimed:,} bytes",
        "this is not a LoRA adapter of a model this machine can handle",
    )
    shapes = {t.name: t.shape for t in header.tensors}
    modules = lora_modules(shapes, settings, str(w_path))
    factor_names = {n for k in modules.values() for n in (k.a, k.b)}
    try:
        with safe_open(str(w_path), framework="pt") as fh:
            factors = {m: (fh.get_tensor(k.a), fh.get_tensor(k.b)) for m, k in modules.items()}
            other = {n: fh.get_tensor(n) for n in shapes if n not in factor_names}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise SourceError(f"{w_path}: cannot read the adapter's tensors ({clip(exc)})") from exc
    return PeftAdapter(config, settings, factors, other)


# --- writing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StackedFactors:
    """The LoRA of one PEFT ``target_parameters`` entry (a 3-D MoE expert parameter), as PEFT's
    ``lora.ParamWrapper`` holds it: ``A (R E, in)``, ``B (out, R E)`` for E experts of rank R
    each (layout: spectra.adapt.expert_targets), its ``alpha``, and ``save_as``: the module path
    PEFT saves the factors under (``<module>.base_layer`` when wrappers nest around it)."""

    A: Tensor
    B: Tensor
    experts: int
    alpha: float
    save_as: str

    def __post_init__(self) -> None:
        A, B, E = self.A, self.B, self.experts
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or E < 1 or A.shape[0] % E:
            raise ValidationError(
                f"stacked factors for {self.save_as!r} do not form a LoRA of {E} experts: "
                f"A {tuple(A.shape)}, B {tuple(B.shape)}"
            )

    @property
    def rank(self) -> int:
        return int(self.A.shape[0]) // self.experts


@dataclass(frozen=True)
class AdapterContent:
    """What ``write_peft_adapter`` writes: ``factors[module] = (A (r, in), B (out, r))``, their
    ``alphas``, rsLoRA or not, the base model the adapter loads onto, the storage ``dtype`` of
    the factors, ``other`` tensors stored as they are (a trained head) and ``config_extra`` keys
    set in ``adapter_config.json`` over the written ones (``modules_to_save``, ``task_type``).

    ``parameters[path]``: the ``StackedFactors`` of a PEFT ``target_parameters`` entry (a 3-D
    MoE expert parameter)."""

    factors: Mapping[str, tuple[Tensor, Tensor]]
    alphas: Mapping[str, float]
    rslora: bool = False
    base_model_name_or_path: str | None = None
    dtype: torch.dtype = torch.float32
    other: Mapping[str, Tensor] = field(default_factory=dict)
    config_extra: Mapping[str, Any] = field(default_factory=dict)
    parameters: Mapping[str, StackedFactors] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.factors and not self.parameters:
            raise ValidationError("no adapter factors to write")
        for module, (A, B) in self.factors.items():
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                raise ValidationError(
                    f"factors of {module!r} do not form a LoRA: A {tuple(A.shape)}, "
                    f"B {tuple(B.shape)}"
                )
        if set(self.alphas) != set(self.factors):
            raise ValidationError("factors and alphas must name the same modules")

    def config(self) -> dict[str, Any]:
        """The ``adapter_config.json`` object: every module listed by full path in both patterns;
        the global ``r`` / ``lora_alpha`` are the most common values."""
        modules = sorted(self.factors)
        params = sorted(self.parameters)
        ranks = {m: int(self.factors[m][0].shape[0]) for m in modules}
        alphas = dict(self.alphas)
        for path in params:
            ranks[path] = self.parameters[path].rank
            alphas[path] = self.parameters[path].alpha
        every = modules + params
        keys = pattern_keys(every)
        config = {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": int(_most_common([ranks[m] for m in every])),
            "lora_alpha": _num(_most_common([alphas[m] for m in every])),
            "target_modules": modules,
            **({"target_parameters": params} if params else {}),
            "rank_pattern": {keys[m]: ranks[m] for m in every},
            "alpha_pattern": {keys[m]: _num(alphas[m]) for m in every},
            "use_rslora": bool(self.rslora),
            "init_lora_weights": True,
            "bias": "none",
            "lora_dropout": 0.0,
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "inference_mode": True,
            "use_dora": False,
        }
        config.update(self.config_extra)
        return config


def _most_common(values: Sequence[Any]) -> Any:
    """The most frequent value (ties: the first seen), for PEFT's global ``r``/``lora_alpha``."""
    return Counter(values).most_common(1)[0][0]


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def write_peft_adapter(out_dir: str | Path, content: AdapterContent) -> Path:
    """Write ``content`` as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads as it
    is; the config is first read back with PEFT's rules and must give every module its rank and
    alpha.

    The folder is created if needed (callers make it atomic with
    ``spectra.outdir.atomic_output_dir``). Factors are stored in ``content.dtype``.
    """
    out = Path(out_dir)
    config = content.config()
    settings = LoraSettings.from_config(config, f"{out / CONFIG_NAME} (to write)")
    tensors: dict[str, Tensor] = {}
    for module, (A, B) in content.factors.items():
        rank, alpha = settings.rank(module), settings.alpha(module)
        if rank != A.shape[0] or alpha != float(content.alphas[module]):  # pragma: no cover
            raise ValidationError(
                f"{module!r}: the config to write resolves to rank {rank} and alpha {alpha}, "
                f"not {A.shape[0]} and {content.alphas[module]}"
            )
        tensors[f"{PREFIX}{module}.lora_A.weight"] = (
            A.detach().to("cpu", content.dtype).contiguous()
        )
        tensors[f"{PREFIX}{module}.lora_B.weight"] = (
            B.detach().to("cpu", content.dtype).contiguous()
        )
    for path, stacked in content.parameters.items():
        rank, alpha = settings.rank(path), settings.alpha(path)
        if rank != stacked.rank or alpha != float(stacked.alpha):  # pragma: no cover
            raise ValidationError(
                f"{path!r}: the config to write resolves to rank {rank} and alpha {alpha}, "
                f"not {stacked.rank} and {stacked.alpha}"
            )
        for name, t in (("lora_A", stacked.A), ("lora_B", stacked.B)):
            tensors[f"{PREFIX}{stacked.save_as}.{name}.weight"] = (
                t.detach().to("cpu", content.dtype).contiguous()
            )
    for name, t in content.other.items():
        tensors[name] = t.detach().cpu().contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
