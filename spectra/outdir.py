"""Atomic output folders: write everything into a temp sibling, then rename into place.

Rules every writer (report, compare, init, convert) follows:
- an existing, non-empty folder that spectra did not create is never touched without `force`;
- a folder spectra created (it holds the marker file) may be replaced with `force`; so may
  another non-empty folder, except a filesystem root, the home folder, the current folder or one
  of its parents, and a folder holding a `.git` repository (refused even with `force`);
- output appears under its final name only when complete; a crash leaves at most a
  `.<name>.spectra-tmp-<pid>-*` sibling, never a half-written folder under the final name;
- the finished folder gets the mode a plain `mkdir` would give (0o777 minus the umask), not
  `mkdtemp`'s private 0o700.

Recovery (`recover_interrupted`, run by `check_output_dir`, so by every writer before it
starts): a `--force` replacement renames the earlier folder to `.<name>.spectra-old-<pid>`,
renames the new one into place, then deletes the old one. A process killed between the two
renames leaves no folder under the final name and the earlier output under the `-old-` name; the
next run restores it to the final name (then refuses or replaces it as usual). A process killed
after the second rename leaves a stale `-old-` sibling next to the new output; the next run
deletes it (the user had asked to replace it). Leftover `-tmp-` siblings of dead processes are
deleted. Siblings whose process is still alive are never touched (another run in progress).
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


_OLD = ".spectra-old-"
_TMP = ".spectra-tmp-"


def check_output_dir(path: Path, *, force: bool) -> None:
    """Raise OutputError if writing to `path` would clobber something the user did not ask to.

    First recovers what an interrupted earlier run left next to `path` (`recover_interrupted`).
    """
    recover_interrupted(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output path {str(path)!r} exists and is not a folder")
    if not (path.is_dir() and any(path.iterdir())):
        return
    made_by_us = (path / MARKER).exists()
    if not force:
        hint = "it holds an earlier spectra output" if made_by_us else "it is not empty"
        raise OutputError(
            f"output folder {str(path)!r} already exists and {hint}: "
            "pass --force to replace it, or choose another --out"
        )
    if not made_by_us:
        reason = _protected_reason(path)
        if reason:
            raise OutputError(
                f"refusing to replace {str(path)!r} even with --force: {reason}; "
                "choose a new or spectra-made --out folder"
            )


def _protected_reason(path: Path) -> str | None:
    """Why a non-spectra folder must never be replaced wholesale, or None.

    `--force` replaces the whole folder, so a typo such as `--out .` or `--out ~` must not wipe a
    working directory, a home, a repository or the filesystem root.
    """
    real = path.resolve()
    cwd = Path.cwd().resolve()
    if real == Path(real.anchor):
        return "it is a filesystem root"
    if real == Path.home().resolve():
        return "it is your home folder"
    if real == cwd or real in cwd.parents:
        return "it is the current folder or one of its parents"
    if (real / ".git").exists():
        return "it holds a git repository"
    return None


def _oserror_message(exc: OSError, path: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return (
            f"disk full while writing {str(path)!r}: nothing was left behind; free space and rerun"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied writing {str(path)!r}: choose a writable --out"
    return f"cannot write {str(path)!r}: {exc.strerror or exc}"


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (ours counts as alive: a swap of this process may be open)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, owned by someone else
        return True
    return True


def _dead_siblings(final: Path, tag: str) -> list[Path]:
    """`.<name><tag><pid>...` siblings of `final` whose process is gone, newest first."""
    prefix = f".{final.name}{tag}"
    found = []
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return []  # parent missing or unreadable: nothing to recover
    for entry in entries:
        if not entry.name.startswith(prefix) or entry.is_symlink() or not entry.is_dir():
            continue
        pid = entry.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            found.append(entry)
    return sorted(found, key=lambda e: e.stat().st_mtime_ns, reverse=True)


def recover_interrupted(path: str | os.PathLike[str]) -> list[str]:
    """Undo what a killed run left next to output folder `path`; returns what it did (lines).

    - `.<name>.spectra-old-<pid>` of a dead process while `path` is missing: the run died
      between the two renames of a forced replacement; the earlier output is restored to `path`.
    - the same while `path` exists: the run died after putting its output in place; the old
      folder (which the user had asked to replace) is deleted.
    - `.<name>.spectra-tmp-<pid>-*` of a dead process: a partial output; deleted.
    """
    final = Path(path).expanduser().absolute()
    done = []
    for old in _dead_siblings(final, _OLD):
        if not final.exists() and not final.is_symlink():
            try:
                os.replace(old, final)
                done.append(f"restored {str(final)!r} from an interrupted replacement")
                continue
            except OSError:
                pass  # could not restore (e.g. permissions): leave it for the user
        else:
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed {old.name!r} left by an interrupted replacement")
    for tmp in _dead_siblings(final, _TMP):
        shutil.rmtree(tmp, ignore_errors=True)
        done.append(f"removed partial output {tmp.name!r} of an interrupted run")
    return done


def _finish_mode(tmp: Path) -> None:
    """Give `tmp` the mode `mkdir` gives under the current umask (mkdtemp made it 0o700).

    Probed with a real mkdir instead of os.umask(), which would change the umask of the whole
    process for a moment (racy with other threads)."""
    probe = tmp / ".spectra-mode-probe"
    probe.mkdir()
    mode = probe.stat().st_mode & 0o7777
    probe.rmdir()
    tmp.chmod(mode)


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
        prefix = f".{final.name}{_TMP}{os.getpid()}-"
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    except OSError as exc:
        raise OutputError(_oserror_message(exc, final)) from exc
    try:
        yield tmp
        (tmp / MARKER).write_text("written by spectra; safe to replace with --force\n")
        _finish_mode(tmp)
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
        old = final.with_name(f".{final.name}{_OLD}{os.getpid()}")
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_output_files(
    path: str | os.PathLike[str], files: dict[str, bytes | str], *, force: bool = False
) -> list[Path]:
    """Write `files` (relative path -> bytes or UTF-8 text) as one atomic output folder.

    Returns the final paths, sorted. The folder appears only when every file is written.
    """
    final = Path(path).expanduser().absolute()
    with atomic_output_dir(final, force=force) as tmp:
        for rel, content in files.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
    return [final / rel for rel in sorted(files)]
