"""Kill a child process at an event point of its work, never after a delay.

The child runs `HOOKS` first: it wraps `os.replace` (every atomic commit: a cache payload or
entry, an output folder swapped into place) and `Path.write_bytes` / `Path.write_text` (every file
written into an output folder), so each of them is an *event* of a kind:

- "cache": an `os.replace` into the cache folder (`KILL_CACHE`), i.e. a cache file committed;
- "swap": an `os.replace` of an output folder (`.spectra-tmp-` / `.spectra-old-` names), or a
  call of `spectra.outdir`'s `_rename_noreplace` / `_exchange` (the swap into place);
- "out": a file written into a `.spectra-tmp-` output folder;
- anything the child's own code announces with `event(kind, what)`.

`KILL_AT="KIND:N"` (KIND "any" counts every event) makes the child stop *before* its N-th (from 0)
event of that kind: it writes "paused <kind> <what>" to the pipe `KILL_FD` and sleeps; the parent
reads that line and SIGKILLs it. The kill therefore lands exactly at that point however loaded the
machine is. `KILL_AT="record"` instead writes one line per event and runs to the end. A child that
ends before its N-th event closes the pipe without pausing: it was not killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import NamedTuple

HOOKS = textwrap.dedent(
    """
    import os as _os, pathlib as _pathlib, time as _time

    _AT = _os.environ.get("KILL_AT", "record")
    _FD = int(_os.environ["KILL_FD"])
    _CACHE = _os.path.realpath(_os.environ["KILL_CACHE"]) if _os.environ.get("KILL_CACHE") else None
    _COUNT = {}

    def event(kind, what):
        n_kind = _COUNT[kind] = _COUNT.get(kind, -1) + 1
        n_any = _COUNT["any"] = _COUNT.get("any", -1) + 1
        if _AT == "record":
            _os.write(_FD, f"{kind} {what}\\n".encode())
            return
        want, n = _AT.split(":")
        if int(n) == (n_any if want == "any" else n_kind) and want in ("any", kind):
            _os.write(_FD, f"paused {kind} {what}\\n".encode())
            while True:  # the parent kills us here
                _time.sleep(60)

    _replace = _os.replace

    def _hooked_replace(src, dst, *args, **kwargs):
        dst_s = str(dst)
        if _CACHE and _os.path.realpath(dst_s).startswith(_CACHE + _os.sep):
            event("cache", _os.path.basename(dst_s))
        elif ".spectra-" in str(src) or ".spectra-" in dst_s:
            event("swap", _os.path.basename(dst_s))
        return _replace(src, dst, *args, **kwargs)

    _os.replace = _hooked_replace

    import spectra.outdir as _outdir

    def _hook_swap(name):
        original = getattr(_outdir, name)

        def swap(src, dst, *args, **kwargs):
            event("swap", _os.path.basename(str(dst)))
            return original(src, dst, *args, **kwargs)

        setattr(_outdir, name, swap)

    _hook_swap("_rename_noreplace")  # the output folder renamed into place (or tried)
    _hook_swap("_exchange")  # a forced replacement: the earlier folder exchanged out

    def _hook_write(name):
        original = getattr(_pathlib.Path, name)

        def write(self, *args, **kwargs):
            parts = self.parts
            tmp = [i for i, p in enumerate(parts) if ".spectra-tmp-" in p]
            if tmp:
                event("out", "/".join(parts[tmp[-1] + 1 :]))
            return original(self, *args, **kwargs)

        setattr(_pathlib.Path, name, write)

    _hook_write("write_bytes")
    _hook_write("write_text")
    """
)

# `python -m spectra ...` with the hooks installed.
SPECTRA_MAIN = (
    HOOKS + "\nimport sys\nsys.argv[0] = 'spectra'\nfrom spectra.cli.main import main\nmain()\n"
)


class Run(NamedTuple):
    """What `run_to_event` saw: whether it killed the child, the child's pipe lines, its pid."""

    killed: bool
    lines: list[str]
    pid: int


def run_to_event(
    code: str, args: list[str], at: str, env: dict[str, str], cache: Path | None = None
) -> Run:
    """Run `python -c code *args`; SIGKILL it at event `at` ("KIND:N"), or record its events
    (`at="record"`). A child that was not killed must exit 0."""
    read, write = os.pipe()
    child_env = {**env, "KILL_AT": at, "KILL_FD": str(write), "KILL_CACHE": str(cache or "")}
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            env=child_env,
            pass_fds=(write,),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        os.close(write)
        killed = False
        lines: list[str] = []
        with os.fdopen(read, encoding="utf-8") as pipe:
            for line in pipe:  # blocks until the child pauses, or ends (EOF)
                lines.append(line.rstrip("\n"))
                if line.startswith("paused "):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = True
                    break
        proc.wait()
        if not killed:
            err.seek(0)
            assert proc.returncode == 0, err.read().decode(errors="replace")
    return Run(killed, lines, proc.pid)
