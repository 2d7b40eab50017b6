"""Shared CLI plumbing: option aliases defined once, and the one place that turns library
exceptions into a one-line message and an exit code."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from spectra.errors import SpectraError

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
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def one_line(message: str) -> str:
    """`message` safe for a terminal line: escape sequences removed, every other control
    character (C0 including newline and tab, DEL, C1) replaced by a space."""
    return _CONTROL.sub(" ", _ESCAPE_SEQ.sub("", message))


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr (control characters and escape sequences removed, rich markup
    escaped) and exit with `code`. Messages can carry file names chosen by a stranger."""
    err_console.print(
        f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True
    )
    raise typer.Exit(code)


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
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence: never a bare traceback
            if STATE.debug:
                raise
            fail(
                f"internal error: {type(exc).__name__}: {exc} "
                "(rerun with `spectra --debug ...` for the traceback and please report it)",
                1,
            )
        return None

    return wrapper  # type: ignore[return-value]


def is_interactive() -> bool:
    """True when stderr is a terminal (progress bars are shown then)."""
    return sys.stderr.isatty()
