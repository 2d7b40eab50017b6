"""Shared pieces of the fuzz suite: bounded hypothesis settings, hostile strings, raw safetensors
writers, and the two guards every fuzz case runs under.

Guards:
- `ReadGuard`: a process-wide `sys.addaudithook` (installed once; hooks cannot be removed) that,
  while armed, records every "open" audit event (`open`, `io.open`, `os.open`, `Path.open`...) of
  a path outside the allowed folders. Imports (site-packages, the repo) are allowed.
- `bounded_alloc`: tracemalloc peak of the case must stay under a bound computed from the true
  file sizes, so nothing allocates what a header merely claims (the claims in these tests are
  gigabytes to exabytes).
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tracemalloc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from spectra.errors import SpectraError

#: One budget for every fuzz test: reproducible (derandomized, no example database) and bounded.
FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

HOSTILE_NAMES = (
    "../../etc/passwd",
    "..\\..\\windows\\system32",
    "/abs/path.weight",
    "<script>alert(1)</script>.weight",
    '"><img src=x onerror=alert(1)>',
    "\x1b[31mred\x1b[0m.weight",
    "\x1b]8;;http://evil/\x1b\\link\x1b]8;;\x1b\\",
    "\x07\x08\r\n\t.weight",
    "[bold]rich markup[/bold].weight",
    "name\u202eolleh.weight",  # right-to-left override
    "\x00nul.weight",
    "\ud800lone-surrogate.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "",
)

hostile_text = st.one_of(st.sampled_from(HOSTILE_NAMES), st.text(max_size=40))


def raw_safetensors(header: bytes, data: bytes = b"", *, hlen: int | None = None) -> bytes:
    """`u64 LE length | header | data`; `hlen` overrides the length prefix."""
    return struct.pack("<Q", len(header) if hlen is None else hlen) + header + data


def header_bytes(obj: Mapping[str, Any]) -> bytes:
    """JSON of a header object, surrogates kept as escapes (json.dumps default ensure_ascii)."""
    return json.dumps(obj).encode("utf-8")


def write_raw(path: Path, blob: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return path


# -- read containment -------------------------------------------------------------------------
class ReadGuard:
    """Records opens outside `allowed` folders while armed (see module docstring)."""

    _installed = False
    _active: list[tuple[Path, ...]] = []
    violations: list[str] = []
    _ignore = tuple(
        {
            os.path.realpath(p)
            for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, Path(__file__).parents[1])
        }
    )

    @classmethod
    def _hook(cls, event: str, args: tuple[Any, ...]) -> None:
        if event != "open" or not cls._active or not args:
            return
        target = args[0]
        if isinstance(target, int) or target is None:
            return  # an fd, opened earlier
        try:
            real = os.path.realpath(os.fsdecode(target))
        except (TypeError, ValueError):
            return
        if real.startswith(cls._ignore) and not real.startswith(cls._active[-1][0].as_posix()):
            return
        if not any(real == str(a) or real.startswith(str(a) + os.sep) for a in cls._active[-1]):
            cls.violations.append(real)

    @classmethod
    @contextmanager
    def armed(cls, *allowed: Path) -> Iterator[list[str]]:
        if not cls._installed:
            sys.addaudithook(cls._hook)
            cls._installed = True
        cls.violations = []
        cls._active.append(tuple(Path(os.path.realpath(a)) for a in allowed))
        try:
            yield cls.violations
        finally:
            cls._active.pop()


# -- allocation bound -------------------------------------------------------------------------
@contextmanager
def bounded_alloc(limit_bytes: int) -> Iterator[None]:
    """Fail when the Python-heap peak inside the block exceeds `limit_bytes`."""
    already = tracemalloc.is_tracing()
    if not already:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    try:
        yield
    finally:
        _, peak = tracemalloc.get_traced_memory()
        if not already:
            tracemalloc.stop()
    grown = peak - base
    if grown > limit_bytes:
        raise AssertionError(f"allocated {grown} bytes, bound {limit_bytes}")


def expect_spectra_error_or(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run `fn`; a SpectraError is a fine outcome (returned, message checked to be one clear
    line naming something), any other exception propagates and fails the test."""
    try:
        return fn(*args, **kwargs)
    except SpectraError as exc:
        msg = str(exc)
        assert msg and len(msg) < 4000, msg
        return exc
