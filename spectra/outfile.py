"""Atomic output files: written to a temporary sibling, then put in place whole.

A file that exists is refused unless ``force``; even with ``force`` a folder, and the run's own
inputs (``protect``: the source checkpoint, its folder, the cache), are never replaced. Without
``force`` the final step is a hard link (fails if the name appeared meanwhile: nothing is
overwritten); with ``force`` an ``os.replace``. A kill leaves at most a ``.<name>.tmp-<pid>``
sibling, never a half-written file under the final name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from spectra.errors import OutputError

Protect = Iterable[str | os.PathLike[str] | None]


def _protected(final: Path, protect: Protect) -> str | None:
    real = final.resolve()
    for item in protect:
        if item is None:
            continue
        other = Path(item).expanduser().resolve()
        if real == other:
            return str(other)
    return None


def check_output_file(path: str | os.PathLike[str], *, force: bool, protect: Protect = ()) -> Path:
    """The absolute output path, or OutputError: a folder there, a file there without
    ``force``, a missing parent folder, or one of the run's inputs."""
    final = Path(path).expanduser().absolute()
    if final.is_dir():
        raise OutputError(f"output {str(final)!r} is a folder: give a file name")
    if not final.parent.is_dir():
        raise OutputError(f"output folder {str(final.parent)!r} does not exist: create it first")
    hit = _protected(final, protect)
    if hit is not None:
        raise OutputError(f"output {str(final)!r} would replace an input ({hit}): pick another")
    if (final.exists() or final.is_symlink()) and not force:
        raise OutputError(f"output {str(final)!r} exists: pass --force to replace it")
    return final


def write_output_file(
    path: str | os.PathLike[str], content: str, *, force: bool, protect: Protect = ()
) -> Path:
    """Write ``content`` (UTF-8 text) to ``path`` atomically (module docstring)."""
    final = check_output_file(path, force=force, protect=protect)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(content, encoding="utf-8")
        if force:
            os.replace(tmp, final)
        else:
            try:
                os.link(tmp, final)
            except FileExistsError as exc:
                raise OutputError(
                    f"output {str(final)!r} appeared while writing: pass --force to replace it"
                ) from exc
    except OSError as exc:
        raise OutputError(f"cannot write {str(final)!r}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return final
