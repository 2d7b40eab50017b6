"""Atomic output folders: write everything into a temp sibling, then rename into place.

Rules every writer (report, compare, init, convert) follows:
- an existing, non-empty folder that spectra did not create is never touched without `force`;
- a folder spectra created (it holds the marker file) may be replaced with `force`;
- output appears under its final name only when complete; a crash leaves at most a
  `.<name>.spectra-tmp-*` sibling, never a half-written folder under the final name.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from spectra.errors import OutputError

MARKER = ".spectra-output"


def check_output_dir(path: Path, *, force: bool) -> None:
    """Raise OutputError if writing to `path` would clobber something the user did not ask to."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"output path {str(path)!r} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not force:
        made_by_us = (path / MARKER).exists()
        hint = "it holds an earlier spectra output" if made_by_us else "it is not empty"
        raise OutputError(
            f"output folder {str(path)!r} already exists and {hint}: "
            "pass --force to replace it, or choose another --out"
        )


def _oserror_message(exc: OSError, path: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return (
            f"disk full while writing {str(path)!r}: nothing was left behind; free space and rerun"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied writing {str(path)!r}: choose a writable --out"
    return f"cannot write {str(path)!r}: {exc.strerror or exc}"


@contextmanager
def atomic_output_dir(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to `path`; on success it replaces `path` atomically.

    On any exception the temp folder is removed and `path` is left exactly as it was.
    OSErrors (disk full, permission denied) become one-line OutputErrors.
    """
    final = Path(path).expanduser().absolute()
    check_output_dir(final, force=force)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.spectra-tmp-", dir=final.parent))
    except OSError as exc:
        raise OutputError(_oserror_message(exc, final)) from exc
    try:
        yield tmp
        (tmp / MARKER).write_text("written by spectra; safe to replace with --force\n")
        _swap_into_place(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(_oserror_message(exc, final)) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename tmp -> final; an existing final (already cleared by check_output_dir) goes away."""
    if final.exists():
        old = final.with_name(f".{final.name}.spectra-old-{os.getpid()}")
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_text_atomic(path: Path, text: str) -> None:
    """Write one file via a temp file + rename (used for files outside an output folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
