"""The `spectra compare` output folder: compare.html, compare.md, compare.json, compare.csv and
plots/*.png, written atomically; plus the terminal summary.

Renders from a `Comparison` only, so every number shown is in compare.json. Strings from the
checkpoints (tensor names, paths) are escaped by the html/markdown builders and made inert for
the terminal by `reports.terminal.safe`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console, Group
from rich.table import Table

from spectra.analysis.comparison import Comparison
from spectra.analysis.drift import ENERGY_LEVEL, RANK_RTOL_RULE
from spectra.analysis.intruders import epsilon_key
from spectra.analysis.pair import PairResult
from spectra.outdir import Protect, check_output_dir, write_output_files
from spectra.reports import html as H
from spectra.reports import markdown as M
from spectra.reports.compare_plots import PLOTS, render_all
from spectra.reports.terminal import safe

KIND_BADGE = {"unchanged": "info", "low-rank": "warn", "full-rank": "ok"}
TOP_ROWS = 15


def _eps_keys(cmp: Comparison) -> list[str]:
    return [epsilon_key(e) for e in cmp.options.epsilons]


def headline(cmp: Comparison) -> list[tuple[str, object]]:
    """(label, value) pairs shown first everywhere."""
    f = cmp.forensics
    first = _eps_keys(cmp)[0]
    return [
        ("matrices compared", f.num_pairs),
        ("changed", f.num_changed),
        ("did not move", len(f.unchanged)),
        ("update", f.update_kind),
        ("apparent rank", f.apparent_rank if f.update_kind in ("low-rank", "mixed") else "-"),
        (f"intruders @ {first}", f.intruders_total[first]),
    ]


def pair_columns(cmp: Comparison) -> list[str]:
    return (
        ["matrix", "role", "layer", "shape", "update"]
        + [f"intruders@{k}" for k in _eps_keys(cmp)]
        + ["min max-cos", "rel change", "rank", "stable rank", "eff. rank", "drift min cos"]
        + ["alpha base", "alpha ft"]
    )


def pair_cells(p: PairResult) -> list[object]:
    u = p.update
    counts = list(p.intruders.to_dict()["counts"].values())
    return (
        [p.key, p.role, p.layer, f"{p.shape[0]}x{p.shape[1]}", p.kind]
        + counts
        + [min(p.intruders.max_cos, default=None), u.rel_change, u.numerical_rank]
        + [u.stable_rank, u.effective_rank, p.drift.min_cos, p.alpha_base, p.alpha_ft]
    )


def _numeric_flags(cmp: Comparison) -> list[bool]:
    return [False, False, True, False, False] + [True] * (len(_eps_keys(cmp)) + 8)


def role_rows(cmp: Comparison) -> list[list[object]]:
    keys = _eps_keys(cmp)
    by_role = cmp.forensics.intruders_by_role
    return [[role] + [by_role[role][k] for k in keys] for role in sorted(by_role)]


def definitions(cmp: Comparison) -> list[str]:
    o = cmp.options
    return [
        f"Intruder: one of the top k = {o.k} left singular vectors of W_ft whose max |cos| to all "
        f"left singular vectors of W_base is below epsilon (Shuttleworth et al., arXiv "
        f"2410.21228); epsilons: {', '.join(_eps_keys(cmp))}. Floor: 1/sqrt(m).",
        f"Numerical rank of dW: {RANK_RTOL_RULE}. Energy rank: smallest r holding "
        f"{ENERGY_LEVEL:.0%} of ||dW||_F^2. Effective rank: exp of the entropy of S/sum S.",
        f"Did not move: ||dW||_F / ||W_base||_F <= {o.unchanged_tol:g}. Low-rank: numerical "
        f"rank <= {cmp.forensics.rules.get('low_rank_fraction')} * min(m, n).",
        "Drift: cosines of the principal angles between the top-k left singular subspaces.",
        "alpha: power-law exponent of the ESD (S^2), Clauset-Shalizi-Newman fit.",
    ]


# -------------------------------------------------------------------------------------- HTML


def _verdict_list(cmp: Comparison) -> H.Markup:
    items = [H.tag("li", v.message) for v in cmp.forensics.verdicts]
    return H.tag("ul", H.join(items))


def _top_table(cmp: Comparison) -> H.Markup:
    top = cmp.forensics.top_layers[:TOP_ROWS]
    if not top:
        return H.paragraph("No matrix has intruders at the first epsilon.", class_="muted")
    rows = [[key, cmp.pair(key).role, cmp.pair(key).layer, n] for key, n in top]
    cols = [H.Column("matrix", name=True), "role", H.Column("layer", True)]
    return H.table(cols + [H.Column("intruders", True)], rows)


def _pairs_table(cmp: Comparison) -> H.Markup:
    names = pair_columns(cmp)
    flags = _numeric_flags(cmp)
    cols = [
        H.Column(n, numeric=f, name=(i == 0))
        for i, (n, f) in enumerate(zip(names, flags, strict=True))
    ]
    rows = []
    for p in cmp.pairs:
        cells = pair_cells(p)
        cells[4] = H.badge(p.kind, KIND_BADGE.get(p.kind, "info"))
        rows.append(cells)
    return H.table(cols, rows)


def _pairing_block(cmp: Comparison) -> H.Markup:
    pr = cmp.pairing
    parts = []
    if pr.base_only:
        what = "not adapted" if cmp.mode == "lora" else "only in the base"
        parts.append(
            H.details(
                f"{len(pr.base_only)} matrices {what}",
                H.tag("ul", H.join(H.tag("li", k) for k in pr.base_only)),
            )
        )
    if pr.ft_only:
        parts.append(
            H.details(
                f"{len(pr.ft_only)} matrices only in the fine-tune",
                H.tag("ul", H.join(H.tag("li", k) for k in pr.ft_only)),
            )
        )
    return H.join(parts) if parts else H.Markup("")


def render_html(cmp: Comparison, plots: dict[str, bytes]) -> str:
    """compare.html: self-contained (PNGs inline), every string escaped."""
    figs = [
        H.figure(plots[name], PLOTS[name][1], PLOTS[name][1]) for name in PLOTS if name in plots
    ]
    role_cols = ["role"] + [H.Column(f"intruders@{k}", True) for k in _eps_keys(cmp)]
    body = [
        H.nav(
            [
                ("Verdicts", "#verdicts"),
                ("Plots", "#plots"),
                ("Matrices", "#pairs"),
                ("Definitions", "#defs"),
            ]
        ),
        H.facts(headline(cmp)),
        H.section("Verdicts", _verdict_list(cmp), id="verdicts"),
        H.section("Intruders by role", H.table(role_cols, role_rows(cmp)), id="roles"),
        H.section("Matrices with the most intruders", _top_table(cmp), id="top"),
        H.section("Plots", *figs, id="plots"),
        H.section("All matrix pairs", _pairs_table(cmp), _pairing_block(cmp), id="pairs"),
        H.section(
            "Definitions", H.tag("ul", H.join(H.tag("li", d) for d in definitions(cmp))), id="defs"
        ),
    ]
    sub = f"{cmp.finetuned} against {cmp.base} ({cmp.mode})"
    foot = H.paragraph(", ".join(f"{k} {v}" for k, v in cmp.versions.items()), class_="muted")
    return H.page("spectra compare", body, subtitle=sub, footer=foot)


# ---------------------------------------------------------------------------------- Markdown


def render_markdown(cmp: Comparison, plots: dict[str, bytes]) -> str:
    """compare.md, linking plots/*.png."""
    parts = [
        M.heading("spectra compare", 1),
        M.md_escape(f"{cmp.finetuned} against {cmp.base} ({cmp.mode})") + "\n",
        M.md_table(["", "value"], [[k, v] for k, v in headline(cmp)]),
        M.heading("Verdicts"),
        M.bullet_list(v.message for v in cmp.forensics.verdicts),
        M.heading("Intruders by role"),
        M.md_table(
            ["role"] + [f"intruders@{k}" for k in _eps_keys(cmp)],
            role_rows(cmp),
            numeric=[False] + [True] * len(_eps_keys(cmp)),
        ),
        M.heading("Plots"),
    ]
    parts += [M.image(PLOTS[n][1], f"plots/{n}.png") for n in PLOTS if n in plots]
    parts += [
        M.heading("All matrix pairs"),
        M.md_table(
            pair_columns(cmp), [pair_cells(p) for p in cmp.pairs], numeric=_numeric_flags(cmp)
        ),
        M.heading("Definitions"),
        M.bullet_list(definitions(cmp)),
    ]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------- terminal


def summary_renderable(cmp: Comparison, *, max_rows: int = TOP_ROWS) -> Group:
    """Headline, verdicts and the top matrices by intruders, for rich."""
    head = Table.grid(padding=(0, 2))
    for label, value in headline(cmp):
        head.add_row(safe(label), safe(H.fmt(value) if isinstance(value, float) else value))
    if len(cmp.options.epsilons) > 1:
        sweep = "  ".join(f"{k}: {n}" for k, n in cmp.forensics.intruders_total.items())
        head.add_row("intruders by epsilon", safe(sweep))
    verdicts = Table.grid()
    for v in cmp.forensics.verdicts:
        verdicts.add_row("• " + safe(v.message))
    if not cmp.forensics.top_layers:
        return Group(head, verdicts)
    top = Table(title="most intruders", title_justify="left", show_edge=False)
    for name in ("matrix", "role", "layer", "rank", "rel change"):
        top.add_column(name, justify="left" if name in ("matrix", "role") else "right")
    top.add_column(f"intruders@{_eps_keys(cmp)[0]}", justify="right")
    for key, n in cmp.forensics.top_layers[:max_rows]:
        p = cmp.pair(key)
        top.add_row(
            safe(key),
            safe(p.role),
            safe(p.layer),
            str(p.update.numerical_rank),
            H.fmt(p.update.rel_change),
            str(n),
        )
    return Group(head, verdicts, top)


def print_summary(cmp: Comparison, console: Console | None = None) -> None:
    (console or Console()).print(summary_renderable(cmp))


# ---------------------------------------------------------------------------------- folder


def write_compare(
    cmp: Comparison,
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    protect: Protect = (),
) -> list[Path]:
    """Write the compare folder atomically; return the final paths written.

    Raises OutputError when `out_dir` exists and is not empty and `force` is False. The two
    compared sources and `protect` (e.g. the cache folder) are never replaced, even with `force`.
    """
    final = Path(out_dir).expanduser().absolute()
    protect = (cmp.base, cmp.finetuned, *protect)
    check_output_dir(final, force=force, protect=protect)  # fail before rendering
    plots = render_all(cmp)
    files: dict[str, bytes | str] = {f"plots/{n}.png": png for n, png in plots.items()}
    files["compare.html"] = render_html(cmp, plots)
    files["compare.md"] = render_markdown(cmp, plots)
    files["compare.json"] = cmp.to_json()
    files["compare.csv"] = cmp.to_csv()
    return write_output_files(final, files, force=force, protect=protect)


__all__: Sequence[str] = ("write_compare", "render_html", "render_markdown", "print_summary")
