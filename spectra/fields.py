"""Argument checks shared by the options dataclasses and the public entry points.

A Python caller who passes `rank="8"`, `k=None` or `source=123` gets a `ValidationError` that
names the argument, the type it needs and the value it got, never a `TypeError` or
`AttributeError` from deep inside a job. `check_fields(obj)` checks every field of a dataclass
against its annotation (int, float, str, bool, None, Path, unions, `tuple[X, ...]`,
`Sequence[X]`, `Mapping[K, V]`, `Callable`); the range checks stay with each class.
"""

from __future__ import annotations

import collections.abc as cabc
import dataclasses
import numbers
import os
import types
import typing
from typing import Any

from spectra.errors import ValidationError

_SHOWN = 80


def _show(value: object) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a hostile __repr__, or an int past the digit limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= _SHOWN else f"{text[: _SHOWN - 20]}...({len(text)} chars)"


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(hint, "__name__", str(hint))


def _matches(value: Any, hint: Any) -> bool:  # noqa: C901, PLR0911 - one case per kind of hint
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        try:
            float(value)
        except OverflowError:  # an int of hundreds of digits
            return False
        return True
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(map(_matches, value, args))
    if origin in (cabc.Sequence, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, cabc.Sequence)):
            return False
        return not args or all(_matches(v, args[0]) for v in value)
    if origin in (cabc.Mapping, dict):
        if not isinstance(value, cabc.Mapping):
            return False
        return not args or all(
            _matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items()
        )
    if origin is cabc.Callable or hint is cabc.Callable:
        return callable(value)
    if isinstance(hint, type):
        if issubclass(hint, os.PathLike):
            return isinstance(value, os.PathLike)
        return isinstance(value, hint)
    return True  # a hint this checker does not know: no claim


def check_value(value: Any, hint: Any, name: str) -> None:
    """`ValidationError` unless `value` is of the annotated type `hint`."""
    if not _matches(value, hint):
        raise ValidationError(
            f"{name} must be {_describe(hint)}, got {type(value).__name__} {_show(value)}"
        )


def check_fields(obj: Any) -> None:
    """Check every field of the dataclass instance `obj` against its annotation."""
    cls = type(obj)
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation only importable for type checkers
        hints = {}
    for f in dataclasses.fields(obj):
        if f.name in hints:
            check_value(getattr(obj, f.name), hints[f.name], f"{cls.__name__}.{f.name}")


def check_instance(value: Any, cls: type, name: str, *, optional: bool = True) -> None:
    """`ValidationError` unless `value` is a `cls` (or None when `optional`)."""
    if (value is None and optional) or isinstance(value, cls):
        return
    raise ValidationError(
        f"{name} must be {'None or ' if optional else ''}a {cls.__name__}, got "
        f"{type(value).__name__} {_show(value)}"
    )


def str_tuple(value: Any, name: str) -> tuple[str, ...]:
    """A string or an iterable of strings as a tuple of strings (`ValidationError` otherwise):
    how the include/exclude/roles fields of the options accept `"q"` as well as `("q", "k")`."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (bytes, cabc.Mapping)) or not isinstance(value, cabc.Iterable):
        raise ValidationError(
            f"{name} must be a string or a sequence of strings, got {type(value).__name__} "
            f"{_show(value)}"
        )
    items = tuple(value)
    bad = [v for v in items if not isinstance(v, str)]
    if bad:
        raise ValidationError(f"{name} must hold strings only, got {_show(bad[0])}")
    return items
