"""Shared CLI plumbing: option aliases defined once, and the one place that turns library
exceptions into a one-line message and an exit code."""

from __future__ import annotations

import errno
import functools
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from spectra.errors import SpectraError, ValidationError
from spectra.formats.files import show_path

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
err_console = Console(stderr=True)


class _State:
    debug: bool = False


STATE = _State()

DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps.")
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Replace an existing, non-empty output folder.")
]
NoCacheOpt = Annotated[
    bool, typer.Option("--no-cache", help="Neither read nor write the spectrum cache.")
]
CacheDirOpt = Annotated[
    str | None,
    typer.Option("--cache-dir", help="Spectrum cache folder (default: the user cache dir)."),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="CPU threads for the decompositions (default: $SPECTRA_NUM_THREADS, else 1: on a "
        "busy machine more threads than free cores run slower, not faster; raise it on an idle "
        "one).",
        show_default=False,
    ),
]
#: Intra-op threads of a command without --threads or $SPECTRA_NUM_THREADS (see `cli_threads`).
DEFAULT_THREADS = 1


def cli_threads(threads: int | None) -> int | None:
    """The thread count a command runs with: `--threads`, else None when $SPECTRA_NUM_THREADS
    is set (the job reads and checks it), else DEFAULT_THREADS. One thread by default: on a busy
    machine, torch's default of one OpenMP thread per core ran the decompositions 2-3x slower
    than one thread (docs/benchmarks.md, bench_threads.py), and one count everywhere keeps runs
    bit-comparable across machines (docs/architecture.md, reproducibility contract)."""
    if threads is not None:
        if threads < 1:
            raise ValidationError(f"--threads must be a positive integer, got {threads}")
        return threads
    if os.environ.get("SPECTRA_NUM_THREADS", "").strip():
        return None
    return DEFAULT_THREADS


IncludeOpt = Annotated[
    list[str] | None,
    typer.Option("--include", help="Glob on tensor names to keep (repeatable)."),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option("--exclude", help="Glob on tensor names to drop (repeatable)."),
]
RolesOpt = Annotated[
    str | None,
    typer.Option("--roles", help="Comma-separated roles to keep, e.g. q,k,v,o,up,gate,down."),
]

RevisionOpt = Annotated[
    str | None,
    typer.Option(
        "--revision",
        help="Hub branch, tag or commit of SOURCE (a Hub repo id; same as org/name@REV).",
        show_default=False,
    ),
]
DiskBudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--disk-budget",
        help="Stream a Hub repo within this much disk (e.g. 20GB, 500MiB, or bytes): each "
        "shard is downloaded once and deleted after (default: download the repo into the Hub "
        "cache).",
        show_default=False,
    ),
]
BaseRevisionOpt = Annotated[
    str | None,
    typer.Option(
        "--base-revision",
        help="Hub branch, tag or commit of BASE (same as org/name@REV).",
        show_default=False,
    ),
]
FinetunedRevisionOpt = Annotated[  # the second checkpoint of compare and mitigate
    str | None,
    typer.Option(
        "--revision",
        help="Hub branch, tag or commit of FINETUNED (same as org/name@REV).",
        show_default=False,
    ),
]
PairDiskBudgetOpt = Annotated[  # commands that read two checkpoints (compare, mitigate)
    str | None,
    typer.Option(
        "--disk-budget",
        help="Stream Hub repos within this much disk in all (e.g. 20GB, 500MiB): half for "
        "each side; each shard is downloaded once and deleted after.",
        show_default=False,
    ),
]
OfflineOpt = Annotated[
    bool,
    typer.Option(
        "--offline",
        help="Read a Hub repo from the local Hub cache only, never the network "
        "(as HF_HUB_OFFLINE=1).",
    ),
]
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)b?\s*", re.IGNORECASE)


def parse_size(text: str, flag: str = "--disk-budget") -> int:
    """'20GB' (10^9), '500MiB' (2^20), '1.5g', '123' (bytes) -> bytes (ValidationError
    otherwise)."""
    from spectra.errors import ValidationError

    m = _SIZE.fullmatch(text)
    if m is None:
        raise ValidationError(
            f"{flag} {one_line(text, 40)!r} is not a size: give bytes or a number with a unit, "
            "e.g. 20GB or 500MiB"
        )
    power = "kmgtp".find(m.group(2).lower()) + 1 if m.group(2) else 0
    size = int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)
    if size <= 0:
        raise ValidationError(f"{flag} must be more than 0 bytes, got {one_line(text, 40)!r}")
    return size


def hub_options(
    revision: str | None, disk_budget: str | None, offline: bool, *, parts: int = 1
) -> Any:
    """The `--revision`, `--disk-budget`, `--offline` flags as a `HubOptions` (the budget split
    into `parts` equal shares: `compare` holds both sides on disk at once). Off a terminal,
    huggingface_hub's progress bars are turned off."""
    from spectra.sources.hub_options import HubOptions

    if not is_interactive():  # huggingface_hub's download bars are for a terminal, not a log
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    budget = None if disk_budget is None else max(1, parse_size(disk_budget) // parts)
    return HubOptions(revision=revision, disk_budget=budget, local_only=True if offline else None)


def split_csv(value: str | None) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    if not value:
        return []
    return [part.strip() for part in value.split(",") if part.strip()]


# ESC sequences first (CSI `ESC [ ... final`, OSC/DCS/APC/PM/SOS strings up to BEL or ST, any
# other `ESC x`), so their parameters do not survive as text; then every C0/C1 control and DEL.
_ESCAPE_SEQ = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b[\]PX^_].*?(?:\x07|\x1b\\|$)"
    r"|\x1b[ -~]?"
    r"|\x9b[0-?]*[ -/]*[@-~]"
    r"|[\x90\x98\x9d-\x9f].*?(?:\x07|\x9c|\x1b\\|$)",
    re.DOTALL,
)
# C0 (newline and tab included), DEL, C1, and the bidirectional controls (U+061C, U+200E/F,
# U+202A-U+202E, U+2066-U+2069) that make a terminal show text in another order than it is
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
#: OSErrors that are about the name of a path the user gave (too long, a symlink loop)
_PATH_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ELOOP})
#: Longest line the CLI prints for one message: a hostile name can make an error 200 KB long.
MAX_LINE = 1000


def one_line(message: str, limit: int = MAX_LINE) -> str:
    """`message` safe for a terminal line: escape sequences removed, every other control
    character (C0 including newline and tab, DEL, C1, bidi overrides) replaced by a space, and
    clipped to `limit` characters (head and tail kept: the tail usually says how to fix it)."""
    text = CONTROL.sub(" ", _ESCAPE_SEQ.sub("", message))
    if len(text) <= limit:
        return text
    tail = limit // 4
    cut = f" ...[{len(text) - limit + 40:,} characters cut]... "
    return text[: limit - tail - len(cut)] + cut + text[-tail:]


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr (control characters and escape sequences removed, rich markup
    escaped) and exit with `code`. Messages can carry file names chosen by a stranger."""
    err_console.print(
        f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True
    )
    raise typer.Exit(code)


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Warnings as one safe line each (`warnings.showwarning` of the `spectra` command): they
    quote paths and tensor names from a stranger."""
    err_console.print(
        f"{category.__name__}: {one_line(str(message))}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def handle_errors(func: F) -> F:
    """Decorator for commands: SpectraError -> one line + exit 2; Ctrl-C -> exit 130.

    With `spectra --debug ...` the original traceback is shown instead.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SpectraError as exc:
            if STATE.debug:
                raise
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)
            abandon_threads(130)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence: never a bare traceback
            if STATE.debug:
                raise
            if isinstance(exc, OSError) and exc.errno in _PATH_ERRNOS:
                # a path the user gave that the OS refuses as a name: their input, not our bug
                name = show_path(str(exc.filename)) if exc.filename is not None else "a path"
                fail(f"{name}: {exc.strerror} (give a shorter or valid path)", 2)
            fail(
                f"internal error: {type(exc).__name__}: {exc} "
                "(rerun with `spectra --debug ...` for the traceback and please report it)",
                1,
            )
        return None

    return wrapper  # type: ignore[return-value]


def abandon_threads(code: int) -> None:
    """After Ctrl-C: when other threads still run (a Hub download, or huggingface_hub's
    download pool, whose workers Python joins at exit even when they are daemons), exit now
    with `code` instead of waiting for their downloads; a partial download left behind is
    reclaimed by the next streamed run. Nothing else runs then: the command's own clean-up
    already ran as the interrupt unwound it."""
    import os
    import threading

    if threading.active_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def is_interactive() -> bool:
    """True when stderr is a terminal (progress bars are shown then)."""
    return sys.stderr.isatty()


PROGRESS_INTERVAL_ENV = "SPECTRA_PROGRESS_INTERVAL"
DEFAULT_PROGRESS_INTERVAL = 30.0


def progress_interval() -> float:
    """Seconds between progress lines off a terminal: $SPECTRA_PROGRESS_INTERVAL, else 30."""
    raw = os.environ.get(PROGRESS_INTERVAL_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_PROGRESS_INTERVAL
    except ValueError:
        value = DEFAULT_PROGRESS_INTERVAL
    return value if value >= 0 else DEFAULT_PROGRESS_INTERVAL


class ProgressLog:
    """Progress as plain lines on stderr where the bars are silent (stderr not a terminal: a
    log file, a pipe, a batch job), so a long run says it is alive and how far it is.

    At most one line per `interval` seconds (`progress_interval()`), the first one only after
    a whole interval, so a short run prints nothing; once a phase that printed has finished,
    one line says so. Lines look like
    `spectra report: matrices 12/40 (30%), 35 MB read, 31 s elapsed, ~72 s left`.
    """

    def __init__(
        self,
        command: str,
        *,
        enabled: bool,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.command = command
        self.enabled = enabled
        self.interval = progress_interval() if interval is None else interval
        self.clock = clock
        self.start = clock()
        self.last = self.start
        self.printed: set[str] = set()
        self.finished: set[str] = set()
        self.began: dict[str, float] = {}

    def update(self, phase: str, done: int, total: int | None, detail: str = "") -> None:
        """Record `done` of `total` units of `phase`; print a line when one is due."""
        if not self.enabled or phase in self.finished:
            return
        now = self.clock()
        began = self.began.setdefault(phase, now)
        complete = total is not None and done >= total
        if complete and phase in self.printed:
            self.finished.add(phase)
        elif now - self.last < self.interval or complete:
            return
        self.last = now
        self.printed.add(phase)
        elapsed = now - self.start
        parts = [f"{phase} {done}/{total}" if total else f"{phase} {done}"]
        if total:
            parts[0] += f" ({100 * done / total:.0f}%)"
        if detail:
            parts.append(detail)
        parts.append(f"{elapsed:.0f} s elapsed")
        if total and 0 < done < total:
            parts.append(f"~{(now - began) / done * (total - done):.0f} s left")
        if complete:
            parts.append("done")
        sys.stderr.write(one_line(f"spectra {self.command}: {', '.join(parts)}") + "\n")
        sys.stderr.flush()
