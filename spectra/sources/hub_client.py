"""Every network call to the Hub goes through `hub_call`: time-bounded, retried when the failure
is transient, and ended in one `HubError` line that says what to do (retry, check the token, check
the repo id/revision, or go offline with a cached copy). Plus `verify_sha256`, the check of a
downloaded (or cached) LFS file against the sha256 the Hub lists for it.

huggingface_hub raises its own error classes (`huggingface_hub.errors`) and those of the HTTP
client it is built on (`httpx2` for huggingface_hub 2.x, `httpx` for 1.x). The client module is
found from huggingface_hub's own `HfHubHTTPError` base class, never imported by name, so a client
swap cannot turn network failures back into internal errors.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TypeVar

from spectra.errors import HubError
from spectra.formats.files import open_input

T = TypeVar("T")
HUB_ATTEMPTS = 3  # tries of one idempotent call before a transient failure is reported
HUB_BACKOFF_S = 1.0  # wait before the 2nd try; doubles after each failure
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_MAX_DETAIL = 160
_VERIFIED: dict[tuple[str, int, int, int, int], str] = {}  # (realpath, ino, size, mtime, ctime)
_VERIFIED_LOCK = threading.Lock()
STAMPS = ".spectra-verified"  # folder of verification stamps inside a repo's Hub cache folder
_OFFLINE_HINT = "or set HF_HUB_OFFLINE=1 to use a copy already in the Hub cache"


@dataclass(frozen=True)
class Failure:
    """What went wrong with a Hub call, in words, and whether trying again may help."""

    what: str
    advice: str
    transient: bool
    network: bool = False  # a timeout or a lost connection (not an HTTP status)


def hub_timeout() -> float:
    """Seconds any one Hub request may wait for a connection or for data: huggingface_hub's
    HF_HUB_DOWNLOAD_TIMEOUT (default 10 s), read at call time."""
    from huggingface_hub import constants

    return float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


def client_module() -> ModuleType:
    """The HTTP client huggingface_hub uses (`httpx2` in 2.x, `httpx` in 1.x)."""
    from huggingface_hub import errors

    for base in errors.HfHubHTTPError.__mro__[1:]:
        root = base.__module__.split(".")[0]
        if root not in ("huggingface_hub", "builtins") and root in sys.modules:
            return sys.modules[root]
    raise RuntimeError("huggingface_hub's HTTP client library was not found")  # pragma: no cover


def network_errors() -> tuple[type[BaseException], ...]:
    """Every exception class a Hub call may raise for a network, server or cache reason."""
    from huggingface_hub import errors

    client = client_module()
    found: list[type[BaseException]] = [errors.HfHubHTTPError, OSError, ValueError]
    for name in ("HTTPError", "InvalidURL", "StreamError"):
        cls = getattr(client, name, None)
        if isinstance(cls, type):
            found.append(cls)
    for name in ("EntryNotFoundError", "XetDownloadError", "FileMetadataError"):
        cls = getattr(errors, name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def bound_timeouts() -> None:
    """Give every request of huggingface_hub's shared HTTP client a timeout.

    huggingface_hub's client is created with `timeout=None` and some of its calls pass
    `timeout=None` explicitly (`repo_info`, used by `snapshot_download`), so a stalled server
    would hang them forever; others wait 60 s per try (the metadata HEAD of an uncached file,
    tried 6 times). A request hook (added once per client) sets every timeout to at most
    `hub_timeout()`.
    """
    from huggingface_hub.utils import get_session

    client = get_session()
    hooks = client.event_hooks
    if _fill_timeouts not in hooks.get("request", []):
        hooks["request"] = [*hooks.get("request", []), _fill_timeouts]
        client.event_hooks = hooks


def _fill_timeouts(request: object) -> None:
    extensions = getattr(request, "extensions", None)
    if not isinstance(extensions, dict):
        return
    limit = hub_timeout()
    current = extensions.get("timeout") or {}
    keys = ("connect", "read", "write", "pool")
    extensions["timeout"] = {k: min(current.get(k) or limit, limit) for k in keys}


def hub_call(label: str, fn: Callable[[], T], *, retry_network: bool = True) -> T:
    """`fn()` (an idempotent Hub request), retried up to HUB_ATTEMPTS times with doubling waits
    when the failure is transient (timeout, lost connection, 408/429/5xx); any failure left ends
    in one HubError line naming `label` (the repo, or repo/file).

    `retry_network=False` for huggingface_hub's downloads, which already retry timeouts and lost
    connections themselves (HEAD 5 times, GET resumed 5 times): only their HTTP 5xx/429 failures,
    which they do not retry, are tried again here, so the retries do not multiply."""
    caught = network_errors()
    for attempt in range(1, HUB_ATTEMPTS + 1):
        bound_timeouts()
        try:
            return interruptible(fn)
        except HubError:
            raise
        except caught as exc:
            failure = describe(exc)
            again = failure.transient and (retry_network or not failure.network)
            if not again or attempt == HUB_ATTEMPTS:
                tries = f" after {attempt} tries" if attempt > 1 else ""
                raise HubError(
                    f"{label}: {failure.what}{tries} ({type(exc).__name__}: {detail(exc)}); "
                    f"{failure.advice}"
                ) from exc
            time.sleep(HUB_BACKOFF_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")  # pragma: no cover


def interruptible(fn: Callable[[], T]) -> T:
    """`fn()` on a daemon thread while the caller waits in short, interruptible steps, so Ctrl-C
    (KeyboardInterrupt, delivered only to the main thread) ends the wait at once instead of
    after every in-flight download: the abandoned request ends with the process (its partial
    file is reclaimed by the next streamed run, `hub.reclaim_partials`). Exceptions of `fn`
    are re-raised here."""
    if threading.current_thread() is not threading.main_thread():
        return fn()  # only the main thread receives KeyboardInterrupt
    box: dict[str, object] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="spectra-hub", daemon=True).start()
    while not done.wait(0.1):
        pass
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def detail(exc: BaseException) -> str:
    """The exception's text on one line, clipped."""
    text = re.sub(r"\s+", " ", str(exc)).strip()
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def describe(exc: BaseException) -> Failure:
    """Classify a failed Hub call (see `hub_call`)."""
    from huggingface_hub import errors

    if isinstance(exc, errors.OfflineModeIsEnabled):
        return Failure("offline mode is on", "unset HF_HUB_OFFLINE to download", False)
    if isinstance(exc, errors.LocalEntryNotFoundError):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, BaseException) and cause is not exc:
            return describe(cause)
        return Failure(
            "the Hub could not be reached and no cached copy was found",
            f"check the network and retry, {_OFFLINE_HINT}",
            True,
            network=True,
        )
    if isinstance(exc, errors.HfHubHTTPError):
        return _describe_http(exc)
    if isinstance(exc, errors.EntryNotFoundError):
        return Failure("a file does not exist in the repo", "check the repo and revision", False)
    client = client_module()
    if isinstance(exc, client.TooManyRedirects):
        return Failure(
            "the Hub (or a proxy) redirects in a loop",
            f"check HF_ENDPOINT and proxy settings, {_OFFLINE_HINT}",
            False,
        )
    if isinstance(exc, (client.TimeoutException, TimeoutError)):
        return Failure(
            f"no answer within {hub_timeout():g} s",
            f"retry later or raise HF_HUB_DOWNLOAD_TIMEOUT, {_OFFLINE_HINT}",
            True,
            network=True,
        )
    if isinstance(exc, (client.TransportError, ConnectionError)):
        return Failure(
            "the connection to the Hub failed",
            f"check the network (and HF_ENDPOINT) and retry, {_OFFLINE_HINT}",
            True,
            network=True,
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES):
        return Failure(
            "the download could not be written to the Hub cache",
            "free space or fix permissions, or set HF_HUB_CACHE to another folder",
            False,
        )
    if isinstance(exc, getattr(errors, "HFValidationError", ())):
        return Failure("not a valid repo id or revision", "check the spelling", False)
    return Failure(
        "the Hub request failed",
        f"check the repo id, revision, network and token, {_OFFLINE_HINT}",
        isinstance(exc, getattr(client, "HTTPError", ())) or isinstance(exc, OSError),
    )


def _describe_http(exc: BaseException) -> Failure:
    from huggingface_hub import errors

    response = getattr(exc, "response", None)
    status = int(getattr(response, "status_code", 0) or 0)
    token = "set a token with access (HF_TOKEN or `hf auth login`)"
    if isinstance(exc, errors.GatedRepoError):
        return Failure(
            "the repo is gated", f"accept its terms on the repo page, then {token}", False
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return Failure(
            "the revision does not exist in the repo",
            "check the revision (branch, tag, commit)",
            False,
        )
    if isinstance(exc, getattr(errors, "RemoteEntryNotFoundError", ())):
        return Failure("the file does not exist at this revision", "check the revision", False)
    if isinstance(exc, errors.RepositoryNotFoundError) or status == 404:
        return Failure(
            "the repo does not exist (or is private)", f"check the repo id, or {token}", False
        )
    if status in (401, 403):
        return Failure(
            f"access denied (HTTP {status})",
            f"check the token: {token}; a gated repo needs its terms accepted",
            False,
        )
    if status in _RETRY_STATUS:
        return Failure(
            f"the Hub is unavailable (HTTP {status})", f"retry later, {_OFFLINE_HINT}", True
        )
    return Failure(
        f"the Hub refused the request (HTTP {status or '?'})",
        "check the repo id and revision",
        False,
    )


# -- sha256 of downloaded bytes ------------------------------------------------------------------
def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    """sha256 (hex) of a file's bytes (opened by `open_input`: a regular file only), memoized
    in-process per (realpath, inode, size, mtime, ctime): a file rewritten is hashed again."""
    real = os.path.realpath(path)
    with open_input(real, "Hub file") as fh:
        st = os.fstat(fh.fileno())
        key = (real, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with _VERIFIED_LOCK:
            known = _VERIFIED.get(key)
        if known is not None:
            return known
        h = hashlib.sha256()
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    digest = h.hexdigest()
    with _VERIFIED_LOCK:
        _VERIFIED[key] = digest
    return digest


def _identity(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"


def _stamped(stamps: Path | None, expected: str, real: str) -> bool:
    """Was this very file (inode, size, mtime, ctime: any rewrite changes the ctime) verified
    against `expected` by an earlier run?"""
    if stamps is None:
        return False
    try:
        return (stamps / expected).read_text(encoding="ascii") == _identity(real)
    except (OSError, UnicodeDecodeError):
        return False


def _stamp(stamps: Path | None, expected: str, real: str) -> None:
    """Record a verified file (best effort: a read-only cache is verified again next time)."""
    if stamps is None:
        return
    try:
        stamps.mkdir(exist_ok=True)
        tmp = stamps / f".{expected}.{os.getpid()}.tmp"
        tmp.write_text(_identity(real), encoding="ascii")
        os.replace(tmp, stamps / expected)
    except OSError:
        return


def verify_sha256(
    label: str, path: Path, expected: str, *, delete: bool, stamps: Path | None = None
) -> str:
    """Check that `path`'s bytes hash to `expected` (the sha256 the Hub lists for this LFS file,
    or the name of its cache blob) and return it. On a mismatch: with `delete`, the file and its
    cache blob are removed and the HubError says a new run downloads it again; without (offline,
    nothing can be re-fetched), the HubError names the blob to delete.

    `stamps` (a folder, `<repo>/.spectra-verified` in the Hub cache) remembers files verified by
    earlier runs by inode, size, mtime and ctime, so an unchanged blob is not hashed on every run,
    while any rewrite of it (which moves its ctime) is hashed again."""
    expected = expected.lower()
    real = os.path.realpath(path)
    if _stamped(stamps, expected, real):
        return expected
    try:
        got = file_sha256(path)
    except OSError as exc:
        raise HubError(f"{label}: cannot read {path} to verify it ({exc.strerror or exc})") from exc
    if got == expected:
        _stamp(stamps, expected, real)
        return got
    what = (
        f"{label}: the bytes on disk do not match the sha256 the Hub lists "
        f"(expected {expected[:16]}..., got {got[:16]}...): a corrupted download or cache blob"
    )
    if delete:
        path.unlink(missing_ok=True)
        Path(real).unlink(missing_ok=True)
        raise HubError(f"{what}; it was deleted, run again to download it anew")
    raise HubError(f"{what}; delete {real} and download it again online")
