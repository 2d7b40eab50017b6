"""Report rendering from a hand-made Analysis: escaping, self-containment, files, plots."""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from _report_fixtures import EVIL, make_analysis
from rich.console import Console

from spectra.analysis.results import Analysis
from spectra.errors import OutputError, ValidationError
from spectra.outdir import MARKER
from spectra.reports import html as H
from spectra.reports import markdown as M
from spectra.reports import plots as P
from spectra.reports import report as R
from spectra.reports.roles import ordered_roles, role_color
from spectra.reports.terminal import print_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk."""
    assert png[:8] == PNG_MAGIC
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


@pytest.fixture(scope="module")
def analysis() -> Analysis:
    return make_analysis()


@pytest.fixture(scope="module")
def written(
    analysis: Analysis, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("report") / "out"
    return out, R.write_report(analysis, out)


# ------------------------------------------------------------------ the folder


def test_folder_holds_every_format_and_plot(
    written: tuple[Path, list[Path]], analysis: Analysis
) -> None:
    out, paths = written
    names = {p.relative_to(out).as_posix() for p in paths}
    assert {"report.html", "report.md", "metrics.json", "metrics.csv"} <= names
    for stem in ("alpha_by_depth", "norms_by_depth", "sv_decay", "outlier_heatmap"):
        assert f"plots/{stem}.png" in names
    esd = sorted(n for n in names if n.startswith("plots/esd-"))
    assert len(esd) == len(analysis.layers)  # 19 matrices, under the default plot limit
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert (out / MARKER).exists()
    # Safe file names even for the key holding a script tag.
    assert all(re.fullmatch(r"plots/[A-Za-z0-9._-]+\.png", n) for n in esd)


def test_json_and_csv_carry_the_analysis_numbers(
    written: tuple[Path, list[Path]], analysis: Analysis
) -> None:
    out, _ = written
    data = json.loads((out / "metrics.json").read_text())
    assert data == analysis.to_dict()
    back = Analysis.from_json(out / "metrics.json")
    assert back.layers == analysis.layers
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(analysis.layers)


def test_html_escapes_checkpoint_strings(written: tuple[Path, list[Path]]) -> None:
    text = (written[0] / "report.html").read_text()
    assert EVIL not in text
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_html_is_self_contained(written: tuple[Path, list[Path]]) -> None:
    out = written[0]
    text = (out / "report.html").read_text()
    refs = re.findall(r'\b(?:src|href)="([^"]*)"', text)
    assert refs, "the page links nothing at all?"
    assert all(r.startswith(("data:image/png;base64,", "#")) for r in refs), refs
    assert "http://" not in text and "https://" not in text
    assert "@import" not in text and "url(" not in text
    # Every embedded image is byte-for-byte one of the PNGs on disk, and every PNG is embedded.
    embedded = {base64.b64decode(r.split(",", 1)[1]) for r in refs if r.startswith("data:")}
    on_disk = {p.read_bytes() for p in (out / "plots").glob("*.png")}
    assert embedded == on_disk
    # Internal links point to ids that exist.
    ids = set(re.findall(r'\bid="([^"]+)"', text))
    anchors = {r[1:] for r in refs if r.startswith("#")}
    assert anchors <= ids


def test_html_sections_in_reading_order(
    written: tuple[Path, list[Path]], analysis: Analysis
) -> None:
    text = (written[0] / "report.html").read_text()
    positions = [text.index(f'id="{s}"') for s in ("summary", "warned", "matrices", "layers")]
    assert positions == sorted(positions)
    warned = text[text.index('id="warned"') : text.index('id="matrices"')]
    for lm in analysis.layers:
        assert (H.esc(lm.key) in warned) == bool(lm.warnings)
    assert text.count('class="item"') == len(analysis.layers)


def test_markdown_escapes_and_links_existing_plots(written: tuple[Path, list[Path]]) -> None:
    out = written[0]
    text = (out / "report.md").read_text()
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert\\(1\\)" not in text  # parentheses are not escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and all((out / link).is_file() for link in links)
    for line in text.splitlines():
        if line.startswith("|"):  # table rows: unescaped pipes delimit cells only
            cells = re.split(r"(?<!\\)\|", line)
            assert cells[0] == "" and cells[-1] == "", line


def test_refuses_non_empty_folder_without_force(tmp_path: Path, analysis: Analysis) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not empty"):
        R.write_report(analysis, out, formats="json")
    assert (out / "notes.txt").read_text() == "keep me"
    paths = R.write_report(analysis, out, formats="json", force=True)
    assert paths == [out.absolute() / "metrics.json"]
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "metrics.json"]


def test_failed_render_leaves_nothing(
    tmp_path: Path, analysis: Analysis, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_a: object, **_k: object) -> str:
        raise RuntimeError("disk gremlin")

    monkeypatch.setattr(Analysis, "to_csv", boom)
    with pytest.raises(RuntimeError):
        R.write_report(analysis, tmp_path / "out", formats="json,csv")
    assert list(tmp_path.iterdir()) == []


def test_parse_formats() -> None:
    assert R.parse_formats(None) == R.FORMATS
    assert R.parse_formats("all") == R.FORMATS
    assert R.parse_formats("csv, HTML") == ("html", "csv")
    assert R.parse_formats(["md"]) == ("md",)
    with pytest.raises(ValidationError, match="pdf"):
        R.parse_formats("html,pdf")


def test_select_esd_keys_prefers_warned_then_spread(analysis: Analysis) -> None:
    keys = [lm.key for lm in analysis.layers]
    assert R.select_esd_keys(analysis, 100) == keys
    picked = R.select_esd_keys(analysis, 9)
    assert len(picked) == 9
    assert picked == [k for k in keys if k in set(picked)]  # analysis order kept
    warned = [lm.key for lm in analysis.layers if lm.warnings]
    assert set(warned) <= set(picked)
    assert R.select_esd_keys(analysis, 0) == []
    with pytest.raises(ValidationError, match="-1"):
        R.select_esd_keys(analysis, -1)
    # With room for the warned ones + one per role, every role is represented.
    roles = {lm.role for lm in analysis.layers}
    picked = set(R.select_esd_keys(analysis, len(warned) + len(roles)))
    assert {analysis.layer(k).role for k in picked} == roles


def test_detail_limited_on_huge_models(analysis: Analysis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("spectra.reports.report.MAX_DETAIL_SECTIONS", 5)
    plots = R.ReportPlots(esd={analysis.layers[4].key: ("esd-004-x", b"")})
    detailed = R.detailed_indices(analysis, plots)
    expected = {i for i, lm in enumerate(analysis.layers) if lm.warnings} | {4}
    assert detailed == expected


# ------------------------------------------------------------------ plots


def test_summary_plots_are_pngs(analysis: Analysis) -> None:
    for render in (P.alpha_by_depth, P.norms_by_depth, P.outlier_heatmap):
        w, h = png_size(render(analysis.layers))
        assert 300 < w < 1600 and 150 < h < 1200
    w, h = png_size(P.sv_decay(analysis.layers, analysis.esds))
    assert w > h  # 7 roles in a 3-column grid


def test_plots_return_none_without_data(analysis: Analysis) -> None:
    no_depth = [replace(lm, layer=None) for lm in analysis.layers]
    assert P.alpha_by_depth(no_depth) is None
    assert P.norms_by_depth(no_depth) is None
    assert P.outlier_heatmap(no_depth) is None
    assert P.sv_decay(analysis.layers, {}) is None
    assert P.esd_plot(np.zeros(8), analysis.layers[0]) is None


def test_esd_plot_handles_failed_fit_and_mathtext_in_names(analysis: Analysis) -> None:
    failed = next(lm for lm in analysis.layers if lm.fit_status == "failed")
    assert png_size(P.esd_plot(analysis.esds[failed.key], failed))[0] > 0
    dollar = replace(analysis.layers[0], key="w$\\frac{a}{$.weight")  # broken mathtext
    assert png_size(P.esd_plot(analysis.esds[analysis.layers[0].key], dollar))[0] > 0


def test_outlier_grid_averages_per_cell(analysis: Analysis) -> None:
    dup = [*analysis.layers, replace(analysis.layers[0], key="extra", outlier_ratio=0.5)]
    depths, roles, grid = P.outlier_grid(dup)
    assert depths == [0, 1, 2]
    assert roles == ["q", "k", "v", "o", "up", "down"]  # embedding has no layer index
    assert grid[0, 0] == pytest.approx((analysis.layers[0].outlier_ratio + 0.5) / 2, rel=1e-15)
    assert grid[2, 5] == analysis.layer("encoder.layer.2.down.weight").outlier_ratio


def test_role_order_and_colours() -> None:
    assert ordered_roles({"zeta", "down", "q", "alpha"}) == ["q", "down", "alpha", "zeta"]
    assert role_color("q") != role_color("k")
    assert role_color("custom") == role_color("custom")
    assert P.short_label("x" * 100, 21) == "x" * 10 + "…" + "x" * 10


# ------------------------------------------------------------------ html / markdown builders


def test_html_builders_escape_text_but_keep_markup() -> None:
    assert H.esc("a<b>&\"c'") == "a&lt;b&gt;&amp;&quot;c&#x27;"
    assert H.esc(H.Markup("<b>x</b>")) == "<b>x</b>"
    assert H.esc("bell\x07esc\x1b[31m") == "bellesc[31m"
    cell = H.table(
        [H.Column("n", numeric=True), "name"], [[1.23456789, EVIL], [None, H.badge("ok", "ok")]]
    )
    assert "1.235" in cell and "–" in cell and EVIL not in cell
    assert '<span class="badge ok">ok</span>' in cell
    attr = H.tag("a", "x", href='"><script>', class_="c")
    assert attr == '<a href="&quot;&gt;&lt;script&gt;" class="c">x</a>'
    with pytest.raises(ValueError):
        H.table(["a", "b"], [[1]])
    doc = H.page(EVIL, [H.section(EVIL, H.figure(PNG_MAGIC, EVIL, EVIL), id="s")], subtitle=EVIL)
    assert EVIL not in doc and doc.count("&lt;script&gt;") == 6
    assert 'content="default-src &#x27;none&#x27;' in doc


def test_fmt() -> None:
    assert H.fmt(None) == "–"
    assert H.fmt(float("nan")) == "–"
    assert H.fmt(3) == "3"
    assert H.fmt(0.000123456, 3) == "0.000123"
    assert H.fmt(True) == "yes"


def test_markdown_builders() -> None:
    assert M.md_escape("a|b*c_d\nE<f>&") == "a\\|b\\*c\\_d E&lt;f&gt;&amp;"
    table = M.md_table(["k", "v"], [["x|y", 0.5], ["z", None]], numeric=[False, True])
    assert table.splitlines() == ["| k | v |", "|---|---:|", "| x\\|y | 0.5 |", "| z | – |"]
    with pytest.raises(ValueError, match="cells"):
        M.md_table(["a"], [[1, 2]])
    with pytest.raises(ValueError, match="characters"):
        M.image("x", "plots/a b).png")


# ------------------------------------------------------------------ terminal


def test_terminal_summary_is_inert(analysis: Analysis) -> None:
    nasty = replace(analysis.layers[0], key="[bold red]boom[/]\x1b]0;pwned\x07")
    a = replace(analysis, layers=[nasty, *analysis.layers[1:]])
    console = Console(record=True, width=200, force_terminal=False, color_system=None)
    print_summary(a, console)
    out = console.export_text()
    assert "[bold red]boom[/]]0;pwned" in out
    assert "\x1b" not in out and "\x07" not in out
    assert f"{a.summary.num_matrices} matrices, {a.summary.num_warned} warned" in out
    assert "over-trained" in out and "under-trained" in out
    console = Console(record=True, width=200, color_system=None)
    print_summary(a, console, max_rows=1)
    assert "... 2 more" in console.export_text()


def test_display_name(tmp_path: Path) -> None:
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert R.display_name(str(tmp_path / "org" / "model")) == "org/model"
    assert R.display_name("Qwen/Qwen2-0.5B") == "Qwen/Qwen2-0.5B"  # a Hub id, not a local path


def _visible_lines(ax) -> dict[str, object]:  # noqa: ANN001 - matplotlib Axes
    return {line.get_label(): line for line in ax.get_lines() if line.get_visible()}


def test_esd_figure_shows_histogram_fit_line_and_xmin(analysis: Analysis) -> None:
    lm = next(x for x in analysis.layers if x.fit_status == "ok")
    lam = analysis.esds[lm.key]
    canvas = P.EsdCanvas()
    fig = P.esd_figure(lam, lm, canvas)
    assert fig is not None
    (ax,) = fig.axes
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert ax.get_title() == lm.key and "eigenvalue" in ax.get_xlabel()
    # The histogram: one step path whose bars integrate to 1 (a density over log bins).
    (hist,) = [p for p in ax.patches if p.get_visible()]
    values, edges, _ = hist.get_data()
    assert len(values) >= 10 and np.isclose(np.sum(values * np.diff(edges)), 1.0)
    lines = _visible_lines(ax)
    fit = lines[f"power law α = {lm.alpha:.3g}"]
    xs, ys = fit.get_data()
    assert np.isclose(xs[0], lm.xmin) and np.isclose(xs[-1], lm.xmax)
    assert np.all(np.diff(ys) < 0)  # a decreasing power law
    slope = np.log(ys[-1] / ys[0]) / np.log(xs[-1] / xs[0])
    assert np.isclose(slope, -lm.alpha)
    marker = lines[f"xmin = {lm.xmin:.3g}"]
    assert list(marker.get_xdata()) == [lm.xmin, lm.xmin] and marker.get_linestyle() == "--"
    assert _legend(canvas) == ["ESD", fit.get_label(), marker.get_label()]
    # Every artist lies inside the view, whose limits are whole decades around the data.
    x0, x1 = ax.get_xlim()
    assert x0 <= lm.xmin <= lm.xmax <= x1 and x0 < edges[0] < edges[-1] < x1
    y0, y1 = ax.get_ylim()
    assert y0 < min(values[values > 0].min(), ys.min()) and max(values.max(), ys.max()) < y1
    for limit in (x0, x1, y0, y1):
        assert np.log10(limit) == round(np.log10(limit))


def test_esd_canvas_reuse_leaves_nothing_of_the_previous_matrix(analysis: Analysis) -> None:
    ok = next(x for x in analysis.layers if x.fit_status == "ok")
    failed = next(x for x in analysis.layers if x.fit_status == "failed")
    canvas = P.EsdCanvas()
    P.esd_plot(analysis.esds[ok.key], ok, canvas)
    fig = P.esd_figure(analysis.esds[failed.key], failed, canvas)
    assert fig is not None
    (ax,) = fig.axes
    assert _visible_lines(ax) == {}  # no fit line or xmin marker of the previous matrix
    texts = [t.get_text() for t in ax.texts if t.get_visible()]
    assert texts == ["power-law fit: failed"]
    assert _legend(canvas) == ["ESD"]
    assert ax.get_title() == failed.key
    # the status sits under the legend's frame, not on it
    status = ax.texts[0].get_window_extent(fig.canvas.get_renderer())
    frame = canvas.legend.frame.get_window_extent(fig.canvas.get_renderer())
    assert status.y1 < frame.y0 and status.x1 <= frame.x1 + 1
    # Drawn after another matrix, a plot is pixel for pixel the one a fresh figure draws.
    reused = P.esd_plot(analysis.esds[ok.key], ok, canvas)
    assert reused == P.esd_plot(analysis.esds[ok.key], ok)


def _legend(canvas: P.EsdCanvas) -> list[str]:
    return [t.get_text() for t in canvas.legend.labels if t.get_visible()]


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_blitted_esd_plots_are_the_full_draws_of_their_figures(analysis: Analysis) -> None:
    """Each plot is drawn over a cached background (axes, ticks, labels at its decade limits);
    the pixels are those of drawing the whole figure, for every matrix in a row, whatever
    background the canvas held before."""
    canvas = P.EsdCanvas()
    ranges = set()
    for lm in analysis.layers:
        fig = P.esd_figure(analysis.esds[lm.key], lm, canvas)
        if fig is None:
            continue
        blitted = canvas.png()
        ranges.add((*canvas.ax.get_xlim(), *canvas.ax.get_ylim()))
        assert np.array_equal(_pixels(blitted), _pixels(P.png_bytes(fig))), lm.key
    assert len(canvas.backgrounds) == min(len(ranges), canvas.BACKGROUNDS)


def test_log_axes_use_plain_text_decade_labels() -> None:
    assert P.decade_label(1e-3) == "10⁻³"
    assert P.decade_label(100.0) == "10²"
    assert P.decade_label(1.0) == "10⁰"
    assert P.decade_label(0.02) == "0.02"
    assert P.decade_label(0.0) == "" and P.decade_label(float("nan")) == ""


def test_layer_sections_show_the_asked_for_fit_results(analysis: Analysis) -> None:
    """Lambda, best_fit, the alpha interval (at the run's level) and the WeightWatcher columns
    appear in a layer's section when computed, and not as empty rows when not."""
    plain = R.render_html(analysis, R.ReportPlots())
    assert "truncated power law cutoff" not in plain and "bootstrap interval" not in plain
    first = replace(
        analysis.layers[0],
        Lambda=0.0123,
        best_fit="truncated_power_law",
        fit_entropy=0.8765,
        alpha_ci_low=2.25,
        alpha_ci_high=2.75,
        rank_loss=3,
    )
    options = {**analysis.options, "ci_level": 0.9}
    asked = replace(analysis, layers=[first, *analysis.layers[1:]], options=options)
    page = R.render_html(asked, R.ReportPlots())
    section = page[page.index('id="layer-0"') :]
    section = section[: section.index("</section>")]
    for text in (
        'truncated power law cutoff Λ</td><td class="num">0.0123',
        "truncated_power_law",
        "0.8765",
        "α 90% bootstrap interval",
        "[2.25, 2.75]",
        'rank loss</td><td class="num">3',
    ):
        assert text in section, text


def test_terminal_lists_warned_matrices_in_layer_order(analysis: Analysis) -> None:
    """model.layers.2 before model.layers.10 (the checkpoint's lexicographic order puts 10
    first)."""
    warned = replace(analysis.layers[0], warnings=("over-trained",))
    names = ["model.layers.10.q.weight", "model.layers.2.q.weight", "model.layers.1.q.weight"]
    layers = [replace(warned, key=k, name=k) for k in names]
    console = Console(record=True, width=200, color_system=None)
    print_summary(replace(analysis, layers=layers), console)
    out = console.export_text()
    positions = [out.index(k) for k in sorted(names, key=lambda k: int(k.split(".")[2]))]
    assert positions == sorted(positions)
