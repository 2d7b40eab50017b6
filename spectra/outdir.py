"""Atomic output folders: write everything into a temp sibling, then rename into place.

Rules every writer (report, compare, init, convert) follows:
- an existing, non-empty folder is never touched without `force` (an empty one counts as absent);
- with `force`, a non-empty folder (spectra-made or not) may be replaced unless the one rule of
  `replace_refusal` refuses it, even with `force`: a filesystem root, a top-level folder, a
  system folder (`/etc`, `/usr`, `/var/lib`, ... and their direct children, `/tmp` itself, the
  temp folder), the home folder or one of its parents, the current folder or one of its
  parents, a folder that is, or holds, one of the run's sources or a cache folder (the run's
  `protect` paths and the caches named by the environment), and a folder that holds a git
  repository or files tracked by the repository it sits in (a git-ignored `repo/demo-report`
  may be replaced);
- the rule is applied when the run starts and again at the moment of the swap, atomically:
  the finished output is renamed into place with `renameat2(RENAME_NOREPLACE)`, so a folder that
  appeared at the final name while the run worked is never replaced by accident (an empty one
  is removed with `rmdir`, which cannot remove anything else); with `force` the folder there is
  re-checked and swapped out with `renameat2(RENAME_EXCHANGE)`, then verified to be the folder
  that was checked (same device and inode) before it is deleted;
- output appears under its final name only when complete; a crash leaves at most a
  `.<name>.spectra-tmp-<pid>-*` sibling, never a half-written folder under the final name;
- the finished folder gets the mode a plain `mkdir` would give (0o777 minus the umask), not
  `mkdtemp`'s private 0o700.

Recovery (`recover_interrupted`, run by `check_output_dir`, so by every writer before it
starts): a `--force` replacement where `renameat2` is missing (not Linux) renames the earlier
folder to `.<name>.spectra-old-<pid>`, renames the new one into place, then deletes the old one.
A process killed between the two renames leaves no folder under the final name and the earlier
output under the `-old-` name; the next run restores it to the final name (then refuses or
replaces it as usual). A process killed after the second rename leaves a stale `-old-` sibling
next to the new output; the next run deletes it (the user had asked to replace it). With
`RENAME_EXCHANGE` the earlier folder is under the `-tmp-` name after the exchange; a kill there
leaves it for the next run to delete, like any `-tmp-` sibling. Leftover `-tmp-` siblings of
dead processes are deleted. Siblings whose process is still alive are never touched (another run
in progress).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from spectra.errors import OutputError

MARKER = ".spectra-output"


_OLD = ".spectra-old-"
_TMP = ".spectra-tmp-"


Protect = Sequence["str | os.PathLike[str] | None"]


def check_output_dir(path: Path, *, force: bool, protect: Protect = ()) -> None:
    """Raise OutputError if writing to `path` would clobber something the user did not ask to.

    protect: the run's sources and cache folders (None and Hub ids that are no local path are
    skipped): a folder that is or holds one is never replaced (`replace_refusal`).
    First recovers what an interrupted earlier run left next to `path` (`recover_interrupted`).
    """
    recover_interrupted(path)
    _check_now(Path(path).expanduser().absolute(), force=force, protect=protect)


def _check_now(path: Path, *, force: bool, protect: Protect) -> None:
    """`check_output_dir` without the recovery: the rule applied to what is at `path` now."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"output path {str(path)!r} exists and is not a folder")
    if not (path.is_dir() and any(path.iterdir())):
        return
    if not force:
        hint = (
            "it holds an earlier spectra output" if (path / MARKER).exists() else "it is not empty"
        )
        raise OutputError(
            f"output folder {str(path)!r} already exists and {hint}: "
            "pass --force to replace it, or choose another --out"
        )
    reason = replace_refusal(path, protect)
    if reason:
        raise OutputError(
            f"refusing to replace {str(path)!r} even with --force: {reason}; "
            "choose a new or spectra-made --out folder elsewhere"
        )


# Top-level folders whose direct children belong to the system (or to other users) too.
_SYSTEM_PARENTS = frozenset(
    "bin boot dev etc home lib lib32 lib64 libx32 opt proc root run sbin srv sys usr var snap "
    "mnt media Users Library System Applications Volumes private nix".split()
)
# Environment variables naming cache folders a replacement must never delete.
_CACHE_ENV = (
    "SPECTRA_CACHE_DIR",
    "XDG_CACHE_HOME",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "TRANSFORMERS_CACHE",
    "TORCH_HOME",
)


def _system_reason(real: Path) -> str | None:
    parts = real.parts
    if len(parts) <= 1:
        return "it is a filesystem root"
    if len(parts) == 2:
        return "it is a top-level system folder"
    if len(parts) == 3 and (parts[1] in _SYSTEM_PARENTS or parts[1].startswith("lib")):
        return f"it is a system folder (a direct child of {parts[0] + parts[1]!r})"
    if real == Path(tempfile.gettempdir()).resolve():
        return "it is the temp folder"
    return None


def _is_or_holds(real: Path, other: Path) -> bool:
    return real == other or real in other.parents


def _candidates(items: Protect) -> list[Path]:
    """Absolute and resolved forms of the local paths among `items` (Hub ids dropped)."""
    out: list[Path] = []
    for item in items:
        if item is None or str(item) == "":
            continue
        try:
            local = Path(item).expanduser().absolute()
            if not (local.exists() or local.is_symlink()):
                continue
            out += [local, local.resolve()]
        except (OSError, RuntimeError, ValueError):
            continue
    return out


def _homes() -> list[Path]:
    homes = [Path.home()]
    try:
        import pwd

        homes.append(Path(pwd.getpwuid(os.getuid()).pw_dir))
    except (ImportError, KeyError, OSError):
        pass
    return [h.resolve() for h in homes]


def _env_caches() -> list[Path]:
    named = [os.environ.get(k) for k in _CACHE_ENV]
    named += [str(h / ".cache") for h in _homes()]
    return _candidates(named)


def replace_refusal(path: Path, protect: Protect = ()) -> str | None:
    """Why folder `path` must never be replaced wholesale, even with `--force`, or None.

    The one rule for every writer: `--force` deletes the whole folder, so a typo such as
    `--out .`, `--out ~`, `--out /etc` or `--out MODEL_DIR` must not delete a working directory,
    a home, a system folder, a source checkpoint, a cache or a repository.
    """
    real = path.resolve()
    absolute = path.absolute()
    reason = _system_reason(real)
    if reason:
        return reason
    if any(_is_or_holds(real, h) for h in _homes()):
        return "it is your home folder or one of its parents"
    if _is_or_holds(real, Path.cwd().resolve()):
        return "it is the current folder or one of its parents"
    for src in _candidates(protect):
        if _is_or_holds(real, src) or _is_or_holds(absolute, src):
            return f"it is or holds {str(src)!r}, an input or the cache of this run"
    for cache in _env_caches():
        if _is_or_holds(real, cache) or _is_or_holds(absolute, cache):
            return f"it is or holds the cache folder {str(cache)!r}"
    return _git_reason(real)


def _git_reason(real: Path) -> str | None:
    """A folder holding a repository, or files a repository around it tracks, is refused."""
    for top, dirs, files in os.walk(real):
        if ".git" in dirs or ".git" in files:
            return f"it holds a git repository ({str(Path(top) / '.git')!r})"
    root = next((p for p in real.parents if (p / ".git").exists()), None)
    if root is None:
        return None
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    cmd = ["git", "-c", "core.fsmonitor=false", "-C", str(root), "ls-files", "-z", "--"]
    try:
        done = subprocess.run(
            [*cmd, str(real.relative_to(root))],
            capture_output=True,
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        done = None
    if done is None or done.returncode != 0:
        return f"it is inside the git repository {str(root)!r} and git could not list its files"
    if done.stdout:
        return f"it holds files tracked by the git repository {str(root)!r}"
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
def atomic_output_dir(
    path: str | os.PathLike[str], *, force: bool = False, protect: Protect = ()
) -> Iterator[Path]:
    """Yield a temp folder next to `path`; on success it replaces `path` atomically.

    protect: the run's sources and cache folders, never replaced (`replace_refusal`). The rule is
    checked now and again at the swap (`_swap_into_place`), so a folder that appears at `path`
    while the caller works is never removed without `force`.
    On any exception the temp folder is removed and `path` is left exactly as it was.
    OSErrors (disk full, permission denied) become one-line OutputErrors.
    """
    final = Path(path).expanduser().absolute()
    check_output_dir(final, force=force, protect=protect)
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
        _swap_into_place(tmp, final, force=force, protect=protect)
    except OSError as exc:
        _remove(tmp)
        raise OutputError(_oserror_message(exc, final)) from exc
    except BaseException:
        _remove(tmp)
        raise


# -- atomic renames --------------------------------------------------------------------------
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _load_renameat2() -> Any:
    """libc's renameat2 (Linux, glibc >= 2.28 or musl), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags): True when done, False when the system lacks it; else raises."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # no syscall, or not on this filesystem
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; FileExistsError if anything is at `dst`, atomically where the system
    has RENAME_NOREPLACE. Fallback: a check then rename(2), which can replace only a folder that
    is empty (POSIX refuses a non-empty one), so nothing is lost in its window either."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Swap `a` and `b` atomically (RENAME_EXCHANGE); False where the system cannot."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


ATOMIC_EXCHANGE = _RENAMEAT2 is not None
"""Whether a forced replacement is one atomic exchange (Linux) rather than two renames."""


def _remove(folder: Path) -> None:
    if folder.is_symlink():
        folder.unlink(missing_ok=True)
    else:
        shutil.rmtree(folder, ignore_errors=True)


def _identity(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def _swap_into_place(tmp: Path, final: Path, *, force: bool, protect: Protect = ()) -> None:
    """Rename tmp -> final with no window: whatever is at `final` now is re-checked by the rule.

    Nothing there (the usual case): RENAME_NOREPLACE. An empty folder there: `rmdir`, which
    removes nothing else, then again. A non-empty one without `force` (it appeared while the run
    worked): refused, left untouched. With `force`: checked by `replace_refusal`, exchanged out,
    verified to be the folder that was checked, then deleted.
    """
    for _ in range(5):
        try:
            _rename_noreplace(tmp, final)
            return
        except FileExistsError:
            pass
        if final.is_dir() and not final.is_symlink():
            try:
                os.rmdir(final)  # only an empty folder goes; anything else stays untouched
                continue
            except OSError:
                pass
        if not force:
            raise OutputError(
                f"output folder {str(final)!r} was created while spectra ran and is not empty: "
                "it was left untouched and nothing was written; pass --force to replace it, or "
                "choose another --out"
            )
        checked = _identity(final)  # before the check: what is deleted must be what was checked
        _check_now(final, force=True, protect=protect)
        _replace_checked(tmp, final, checked)
        return
    raise OutputError(f"output folder {str(final)!r} keeps changing: choose another --out")


def _replace_checked(tmp: Path, final: Path, checked: tuple[int, int]) -> None:
    """Replace the folder at `final`, just checked, by `tmp`; delete it only if it is the same
    folder (device and inode `checked`) that was checked, else put it back and refuse."""
    if _exchange(tmp, final):
        moved = tmp  # the earlier folder is now under the temp name, ours under the final one
        if _identity(moved) != checked:
            _put_back(moved, final, exchanged=True)
    else:
        moved = final.with_name(f".{final.name}{_OLD}{os.getpid()}")
        os.replace(final, moved)
        if _identity(moved) != checked:
            _put_back(moved, final, exchanged=False)
        try:
            _rename_noreplace(tmp, final)
        except OSError:
            _put_back(moved, final, exchanged=False)
            raise
    _remove(moved)


def _put_back(moved: Path, final: Path, *, exchanged: bool) -> None:
    """Return a folder moved away from `final` to its place; raises OutputError (always)."""
    try:
        if exchanged:
            if not _exchange(moved, final):
                raise OSError(errno.ENOSYS, "exchange failed")
        else:
            _rename_noreplace(moved, final)
    except OSError as exc:
        kept = final.with_name(f".{final.name}.spectra-kept-{os.getpid()}")
        os.rename(moved, kept)
        raise OutputError(
            f"output folder {str(final)!r} changed while spectra replaced it: the folder that was "
            f"there is kept at {str(kept)!r}; nothing was deleted"
        ) from exc
    raise OutputError(
        f"output folder {str(final)!r} changed while spectra replaced it: it was put back and "
        "nothing was written; rerun"
    )


def write_output_files(
    path: str | os.PathLike[str],
    files: dict[str, bytes | str],
    *,
    force: bool = False,
    protect: Protect = (),
) -> list[Path]:
    """Write `files` (relative path -> bytes or UTF-8 text) as one atomic output folder.

    Returns the final paths, sorted. The folder appears only when every file is written.
    protect: the run's sources and cache folders (see `atomic_output_dir`).
    """
    final = Path(path).expanduser().absolute()
    with atomic_output_dir(final, force=force, protect=protect) as tmp:
        for rel, content in files.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
    return [final / rel for rel in sorted(files)]
