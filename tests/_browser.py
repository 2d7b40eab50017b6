"""Open a local HTML file in headless Debian Chromium (Playwright) and report what a reader sees.

Reusable by every command's HTML test:

    from _browser import browser_unavailable, render_in_chromium
    REASON = browser_unavailable()
    pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))
    result = render_in_chromium(path)
    assert result.console_errors == [] and result.page_errors == [] and result.dialogs == []

The browser runs with networking features off; a page that tries to reach the network shows
it as a failed request in `result.requests` (anything but file: and data: URLs).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@dataclass(frozen=True)
class BrowserResult:
    """What the page did. images: (first 40 characters of src, naturalWidth) per <img>;
    script_elements: how many <script> elements the parsed DOM holds."""

    console_errors: list[str]
    page_errors: list[str]
    dialogs: list[str]
    images: list[tuple[str, int]]
    title: str
    text: str
    requests: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    script_elements: int = 0


def _missing_browser() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright; it is in the dev extra)"
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        return f"chromium not found at {CHROMIUM} (make browser-deps installs the Debian package)"
    return None


def browser_unavailable() -> str | None:
    """None when Playwright and Chromium are installed, else the reason (for pytest.skip).

    With SPECTRA_REQUIRE_BROWSER=1 (set by .ci/run) a missing browser is an error, not a skip,
    so CI can never go green without having looked at the pages.
    """
    reason = _missing_browser()
    if reason and os.environ.get("SPECTRA_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"SPECTRA_REQUIRE_BROWSER=1 but {reason}")
    return reason


def render_in_chromium(html_path: str | Path, *, timeout_ms: int = 30_000) -> BrowserResult:
    """Load `html_path` (file://) in headless Chromium and collect errors, images and text."""
    from playwright.sync_api import sync_playwright

    url = Path(html_path).absolute().as_uri()
    console_errors: list[str] = []
    page_errors: list[str] = []
    dialogs: list[str] = []
    requests: list[str] = []
    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page()
            page.on(
                "console",
                lambda msg: console_errors.append(msg.text) if msg.type == "error" else None,
            )
            page.on("pageerror", lambda exc: page_errors.append(str(exc)))

            def on_dialog(dialog) -> None:  # noqa: ANN001 - playwright Dialog
                dialogs.append(f"{dialog.type}: {dialog.message}")
                dialog.dismiss()

            page.on("dialog", on_dialog)
            page.on(
                "request",
                lambda req: (
                    requests.append(req.url) if not req.url.startswith(("file:", "data:")) else None
                ),
            )
            page.goto(url, wait_until="load", timeout=timeout_ms)
            # Lazy images load once scrolled to; force them all so naturalWidth is meaningful.
            page.evaluate(
                "() => Promise.all(Array.from(document.images).map(img => {"
                " img.loading = 'eager';"
                " return img.complete ? null : new Promise(r => { img.onload = img.onerror = r; });"
                "}))"
            )
            images = page.evaluate(
                "() => Array.from(document.images).map(i => [i.src.slice(0, 40), i.naturalWidth])"
            )
            ids = page.evaluate(
                "() => Array.from(document.querySelectorAll('[id]')).map(e => e.id)"
            )
            scripts = page.evaluate("() => document.querySelectorAll('script').length")
            return BrowserResult(
                console_errors=console_errors,
                page_errors=page_errors,
                dialogs=dialogs,
                images=[(str(src), int(width)) for src, width in images],
                title=page.title(),
                text=page.inner_text("body"),
                requests=requests,
                ids=list(ids),
                script_elements=int(scripts),
            )
        finally:
            browser.close()
