"""report.html opened in headless Chromium: no errors, every image decodes, names stay text."""

from __future__ import annotations

from pathlib import Path

import pytest
from _browser import browser_unavailable, render_in_chromium
from _report_fixtures import EVIL, make_analysis

from spectra.reports.report import write_report

REASON = browser_unavailable()
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(REASON is not None, reason=str(REASON)),
]


def test_report_renders_cleanly_in_chromium(tmp_path: Path) -> None:
    analysis = make_analysis()
    write_report(analysis, tmp_path / "out", formats="html")
    result = render_in_chromium(tmp_path / "out" / "report.html")

    assert result.console_errors == []
    assert result.page_errors == []
    assert result.dialogs == []  # alert(1) never ran
    assert result.requests == []  # nothing fetched from the network
    assert result.script_elements == 0  # the name did not become a <script> element
    # The hostile name is shown as text, in the standouts, the table and its own section.
    assert result.text.count(EVIL) >= 3
    assert result.title.startswith("spectra report")
    # Summary, warned layers and one section per matrix are present.
    for anchor in ("summary", "warned", "matrices", "layers"):
        assert anchor in result.ids
    assert {f"layer-{i}" for i in range(len(analysis.layers))} <= set(result.ids)
    assert "Model summary" in result.text and "Per-layer detail" in result.text
    # 4 model-level plots + one ESD per matrix, each decoded to a real bitmap.
    assert len(result.images) == 4 + len(analysis.layers)
    assert all(src.startswith("data:image/png;base64,") for src, _ in result.images)
    assert all(width > 0 for _, width in result.images), result.images
