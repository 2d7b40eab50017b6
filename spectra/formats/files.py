"""Input files: the one way spectra opens a file it reads.

Every JSON, text and safetensors file spectra reads (configs, indexes, adapter configs, manifests,
calibration text, shard headers and data) is opened by `open_input`, which

- opens without blocking (`O_NONBLOCK`), so a FIFO put in place of a file cannot hang the open;
- checks the opened descriptor (`fstat`, after symlinks are resolved) is a regular file, so a
  symlink to `/dev/zero`, a FIFO, a socket or a folder is refused in one line;
- turns every `OSError` (missing, permission, a name too long, a symlink loop) into a
  `SourceError` whose path is clipped.

`read_input` reads a whole small file through it, at most `limit` bytes: a file that holds more is
refused, whatever its `st_size` says. Size checks never trust `st_size` of anything but a regular
file.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any, BinaryIO

from spectra.errors import SourceError, ValidationError

#: Bounds for the small files spectra reads whole (JSON and text). A real `config.json` is a few
#: KB, a real index a few MB (the safetensors header limit of 100 MB bounds them all).
MAX_JSON_BYTES = 100_000_000
#: Calibration text files: far more text than any calibration run uses.
MAX_TEXT_BYTES = 1_000_000_000
_PATH_SHOWN = 160


def show_path(path: str | os.PathLike[str]) -> str:
    """`path` as text for a message, clipped to a readable length."""
    text = os.fspath(path)
    if len(text) <= _PATH_SHOWN:
        return text
    return f"{text[: _PATH_SHOWN // 2]}...{text[-_PATH_SHOWN // 2 + 20 :]} ({len(text)} chars)"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def open_input(path: str | os.PathLike[str], what: str = "file") -> BinaryIO:
    """`path` opened for binary reading, after checking it is a regular file (symlinks resolved).

    `what` names the file in messages ("config", "shard", ...). Never blocks on a FIFO; raises
    `SourceError` in one line for anything else than a readable regular file.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise SourceError(f"{show_path(path)}: cannot open {what} ({_os_reason(exc)})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SourceError(
                f"{show_path(path)}: {what} is {_kind(mode)}, not a regular file: "
                "replace it with the real file"
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # regular files ignore it; keep the usual semantics
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_input(path: str | os.PathLike[str], what: str = "file") -> int:
    """Size in bytes of the regular file `path` (opened and checked as `open_input` does), for
    readers that must hand a path to another library (`safetensors.safe_open`)."""
    with open_input(path, what) as fh:
        return os.fstat(fh.fileno()).st_size


def read_input(path: str | os.PathLike[str], limit: int, what: str = "file") -> bytes:
    """The bytes of the regular file `path`, refused (`SourceError`) if it holds more than `limit`
    bytes: at most `limit + 1` bytes are ever read, whatever the file claims to be."""
    with open_input(path, what) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise SourceError(
                f"{show_path(path)}: {what} is {size} bytes, more than the {limit} allowed: "
                "not a real one"
            )
        try:
            data = _read_upto(fh, size, limit)
        except OSError as exc:
            raise SourceError(
                f"{show_path(path)}: cannot read {what} ({_os_reason(exc)})"
            ) from None
    if len(data) > limit:
        raise SourceError(f"{show_path(path)}: {what} grew past the {limit} bytes allowed")
    return data


def _read_upto(fh: BinaryIO, size: int, limit: int) -> bytes:
    """At most `limit + 1` bytes of `fh`; buffers sized by the file, never by `limit` alone
    (`read(n)` allocates `n` bytes up front)."""
    chunks: list[bytes] = []
    total, want = 0, min(size, limit) + 1
    while total <= limit:
        block = fh.read(min(want, limit + 1 - total))
        if not block:
            break
        chunks.append(block)
        total += len(block)
        want = 1 << 20  # the file grew since fstat: go on in small steps
    return b"".join(chunks)


def read_text_input(path: str | os.PathLike[str], limit: int, what: str = "file") -> str:
    """`read_input` decoded as UTF-8 (a `SourceError` if it is not)."""
    data = read_input(path, limit, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(
            f"{show_path(path)}: {what} is not UTF-8 text (byte {exc.start}: {exc.reason})"
        ) from None


def read_json_input(path: str | os.PathLike[str], what: str, limit: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in `path` (read by `read_text_input`); every way it can fail to parse
    (malformed, a number of thousands of digits, nesting deeper than the stack) is one line."""
    text = read_text_input(path, limit, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(
            f"{show_path(path)}: {what} is not valid JSON ({exc.msg} at byte {exc.pos})"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise SourceError(
            f"{show_path(path)}: {what} is not readable JSON ({type(exc).__name__}: "
            "a number too long or nesting too deep)"
        ) from None


def path_exists(path: str | os.PathLike[str], what: str = "path") -> bool:
    """Whether `path` exists (symlinks followed). Missing is False; any other `OSError` (a name
    longer than the file system allows, a symlink loop, no permission) is a one-line
    `SourceError` with the path clipped, not an `OSError` that `Path.exists()` lets through."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        reason = _os_reason(exc)
        raise SourceError(f"{show_path(path)}: cannot use this {what} ({reason})") from None
    except ValueError:  # an embedded NUL
        raise SourceError(f"{show_path(repr(os.fspath(path)))}: not a valid {what}") from None
    return True


def check_source(source: object, what: str = "source") -> None:
    """`ValidationError` unless `source` is a path (str or os.PathLike); `SourceError` when the
    OS refuses the path itself (too long, a symlink loop): what every public entry point taking
    a checkpoint, adapter or folder checks first."""
    if isinstance(source, bool) or not isinstance(source, (str, os.PathLike)):
        raise ValidationError(
            f"{what} must be a path or a Hub repo id (str), got {type(source).__name__} "
            f"{_clip_repr(source)}"
        )
    path_exists(os.path.expanduser(source), f"{what} path")


def _clip_repr(value: object, limit: int = 120) -> str:
    """`repr(value)` cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}...({len(text)} chars)"
