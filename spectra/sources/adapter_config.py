"""Validation of a PEFT `adapter_config.json` before any of it is used.

Adapter folders come from strangers: every field spectra reads is type-checked here, so a bad
config is one `SourceError` naming the field and the value, never a `TypeError` deep inside.
`rank_pattern` / `alpha_pattern` keys are regexes (PEFT matches them with
`re.match(rf"(.*\\.)?({key})$", module)`); a key that does not compile, or that repeats a group
which itself repeats or alternates (`(a+)+`, `(a|a)*`: exponential backtracking on a crafted
module name), is refused. Real patterns are module paths or simple `.*` wildcards.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from spectra.errors import SourceError
from spectra.formats.safetensors import clip

try:  # Python >= 3.11
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

MAX_PATTERN_CHARS = 1000
_REPEATS = {
    getattr(_sre_parse, n)
    for n in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
    if hasattr(_sre_parse, n)
}
_BRANCH = _sre_parse.BRANCH


def validate_adapter_config(config: Any, where: str) -> dict[str, Any]:
    """The config dict, checked: `r` (int >= 1), `lora_alpha` (finite number), `use_rslora`
    (bool), `rank_pattern` ({regex: int >= 1}), `alpha_pattern` ({regex: finite number}).

    Absent fields are fine (PEFT defaults apply later); present ones must have the right type.
    """
    if not isinstance(config, dict):
        raise SourceError(
            f"{where}: adapter config must be a JSON object, got {type(config).__name__}"
        )
    if "r" in config:
        _positive_int(config["r"], f"{where}: r")
    if "lora_alpha" in config:
        _finite_number(config["lora_alpha"], f"{where}: lora_alpha")
    if "use_rslora" in config and not isinstance(config["use_rslora"], bool):
        raise SourceError(
            f"{where}: use_rslora must be true or false, got {clip(config['use_rslora'])}"
        )
    for field, check in (("rank_pattern", _positive_int), ("alpha_pattern", _finite_number)):
        patterns = config.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, Mapping):
            raise SourceError(
                f"{where}: {field} must map module patterns to values, got {clip(patterns)}"
            )
        for key, value in patterns.items():
            check_pattern(key, f"{where}: {field} key {clip(key)}")
            check(value, f"{where}: {field}[{clip(key)}]")
    return config


def _positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SourceError(f"{what} must be a positive integer, got {clip(value)}")


def _finite_number(value: Any, what: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value):
        raise SourceError(f"{what} must be a finite number, got {clip(value)}")


def check_pattern(pattern: str, what: str) -> None:
    """Refuse a pattern that does not compile, is absurdly long, or can backtrack exponentially."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise SourceError(f"{what}: pattern longer than {MAX_PATTERN_CHARS} characters")
    try:
        parsed = _sre_parse.parse(pattern)
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise SourceError(f"{what}: not a valid regular expression ({exc})") from exc
    if _nested_repeat(parsed, inside_repeat=False):
        raise SourceError(
            f"{what}: a repeated group that itself repeats or alternates (like (a+)+ or (a|b)*) "
            "can take exponential time; write the module path, or a single .* wildcard"
        )


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
        else:
            for part in av if isinstance(av, (tuple, list)) else ():
                if isinstance(part, _sre_parse.SubPattern) and _nested_repeat(
                    part, inside_repeat=inside_repeat
                ):
                    return True
    return False
