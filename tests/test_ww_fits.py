"""WeightWatcher 0.7.7's power-law fit options (xmax, fix_fingers 'clip_xmax' / 'xmin_peak')
against WeightWatcher and the powerlaw package run in the test on the bundled MiniLM
(methods.md section 2b). One subprocess for all of them, four layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _ww_fixtures import WW_LAYERS, ww_rows

from spectra.analysis.fingers import FitOptions, esd_peak, fit_tail
from spectra.analysis.powerlaw import fit_powerlaw
from spectra.errors import ValidationError
from spectra.jobs.report import AnalyzeOptions, analyze

REL = 1e-4
COLUMNS = ("alpha", "xmin", "D", "sigma", "num_pl_spikes")

# WeightWatcher 0.7.7 routes xmin_peak (and TPL / E_TPL) to powerlaw.Fit(..., distribution=...),
# a keyword powerlaw 2.0 no longer takes: every layer fails. So the reference for xmin_peak is
# WeightWatcher's own recipe (its lines for the peak and the range) on the powerlaw package.
_XMIN_PEAK = """
def _xmin_peak(layer_id, quirk):
    import powerlaw
    evals = watcher.get_ESD(layer=layer_id)
    nz = evals[evals > 1e-5]
    h = np.histogram(np.log10(nz), bins=100)
    xmin2 = 10 ** h[1][np.argmax(h[0])]
    lo = np.log10(0.95 * xmin2) if quirk else 0.95 * xmin2
    fit = powerlaw.Fit(nz, xmin=(lo, 1.5 * xmin2), xmin_distribution="power_law", verbose=False)
    n = int(np.sum(evals >= fit.xmin))
    return dict(alpha=fit.alpha, xmin=fit.xmin, D=fit.D, sigma=fit.sigma, num_pl_spikes=n)

_extra = {}
for _lid in LAYERS:
    for _quirk in (True, False):
        _extra[f"{_lid}:{_quirk}"] = _xmin_peak(_lid, _quirk)
from weightwatcher.RMT_Util import fit_clipped_powerlaw
_rng = np.random.default_rng(0)
_lam = np.linalg.svd(_rng.standard_normal((800, 400)), compute_uv=False) ** 2
_best, _nf, _raw = fit_clipped_powerlaw(np.sort(np.append(_lam, 1.3 * _lam.max())))
_extra["planted"] = dict(alpha=_best.alpha, num_fingers=_nf, raw_alpha=_raw.alpha)
_df = watcher.analyze(layers=LAYERS, xmax=3)
_extra["xmax=3"] = json.loads(_df.to_json(orient="records"))
from weightwatcher.RMT_Util import line_entropy
from weightwatcher.WW_powerlaw import WWFit
for _lid in LAYERS:
    _ev = watcher.get_ESD(layer=_lid)
    _extra[f"entropy:{_lid}"] = float(line_entropy(WWFit(_ev[_ev > 1e-5]).Ds))
_df = watcher.analyze(layers=LAYERS, fit="E_TPL", xmax="force", pl_package="powerlaw")
_extra["E_TPL"] = json.loads(_df.to_json(orient="records"))
"""


@pytest.fixture(scope="session")
def ww_fits(minilm_path: Path) -> dict:
    prelude = f"LAYERS = {sorted(WW_LAYERS)}\n" + _XMIN_PEAK
    rows = ww_rows(minilm_path, "fix_fingers='clip_xmax'", extra="_extra", setup=prelude)
    extra = rows["__extra__"]
    extra["fix_fingers='clip_xmax'"] = [rows[key] for key in WW_LAYERS.values()]
    return extra


def _ours(minilm_path: Path, **fit: object):
    options = AnalyzeOptions(include=tuple(WW_LAYERS.values()), device="cpu", outliers=False, **fit)
    return analyze(minilm_path, options, cache=None)


def _check(lm, want: dict, columns: tuple[str, ...] = COLUMNS) -> None:
    for col in columns:
        got = getattr(lm, col)
        assert got == pytest.approx(want[col], rel=REL), (lm.key, col, got, want[col])


@pytest.mark.parametrize("kw", ["fix_fingers='clip_xmax'", "xmax=3"])
def test_clip_xmax_and_xmax_equal_weightwatcher(ww_fits, minilm_path: Path, kw: str) -> None:
    fit = {"fix_fingers": "clip_xmax", "ww_quirks": True} if "clip" in kw else {"xmax": 3}
    an = _ours(minilm_path, **fit)
    theirs = {row["name"] + ".weight": row for row in ww_fits[kw]}
    for lm in an.layers:
        _check(lm, theirs[lm.key], (*COLUMNS, "xmax"))
        if "clip" in kw:
            assert (lm.num_fingers, lm.raw_alpha) == (
                theirs[lm.key]["num_fingers"],
                pytest.approx(theirs[lm.key]["raw_alpha"], rel=REL),
            )
    if kw == "xmax=3":  # the option has teeth: alpha moves on every layer
        plain = _ours(minilm_path)
        assert all(a.alpha != b.alpha for a, b in zip(an.layers, plain.layers, strict=True))


@pytest.mark.parametrize("quirk", [True, False])
def test_xmin_peak_equals_powerlaw_package(ww_fits, minilm_path: Path, quirk: bool) -> None:
    an = _ours(minilm_path, fix_fingers="xmin_peak", ww_quirks=quirk)
    for layer_id, key in WW_LAYERS.items():
        _check(an.layer(key), ww_fits[f"{layer_id}:{quirk}"])
    # the quirk matters: the log10 lower bound is no bound, so on the position embeddings the
    # quirky fit keeps the plain xmin, far below the ESD's peak
    assert ww_fits[f"1:{True}"]["xmin"] != pytest.approx(ww_fits[f"1:{False}"]["xmin"], rel=0.1)


def test_weightwatcher_tpl_and_force_fail_under_powerlaw_2(ww_fits) -> None:
    """WeightWatcher 0.7.7 sends fit='TPL' / 'E_TPL', xmin_peak and xmax='force' to
    powerlaw.Fit(..., distribution=...), a keyword powerlaw 2.0 refuses: every layer comes back
    failed (alpha -1). So test_tpl.py takes the powerlaw package itself as the reference."""
    rows = ww_fits["E_TPL"]
    assert len(rows) == len(WW_LAYERS)
    assert all(row["status"] == "failed" and row["alpha"] == -1 for row in rows)


def test_fit_entropy_equals_weightwatcher_line_entropy(ww_fits, minilm_path: Path) -> None:
    """fit_entropy: WeightWatcher's (commented-out) line_entropy(fit.Ds) of its own fit, run in
    the test on each layer's ESD."""
    an = _ours(minilm_path, fit_entropy=True)
    plain = _ours(minilm_path)
    for layer_id, key in WW_LAYERS.items():
        lm = an.layer(key)
        assert lm.fit_entropy == pytest.approx(ww_fits[f"entropy:{layer_id}"], rel=1e-9), key
        assert lm.alpha == plain.layer(key).alpha  # the fit itself is unchanged


def _fingered() -> np.ndarray:
    """The ESD of a 800 x 400 Gaussian matrix (an MP bulk, no heavy tail) with one planted
    finger at 1.3 x its top: the plain fit takes the finger for a tail (alpha ~ 14)."""
    rng = np.random.default_rng(0)
    lam = np.linalg.svd(rng.standard_normal((800, 400)), compute_uv=False) ** 2
    return np.sort(np.append(lam, 1.3 * lam.max()))


def test_clip_xmax_removes_a_planted_finger(ww_fits) -> None:
    lam = _fingered()
    raw = fit_powerlaw(lam)
    tail = fit_tail(lam, FitOptions(fix_fingers="clip_xmax"))
    assert raw.alpha > 10 and tail.raw_alpha == raw.alpha
    assert tail.num_fingers == 1 and tail.fit.alpha == fit_powerlaw(lam[:-1]).alpha
    assert tail.fit.alpha < 7
    # every eigenvalue >= xmin counts, the clipped finger too
    assert tail.fit.num_spikes == int(np.count_nonzero(lam >= tail.fit.xmin))
    # WeightWatcher never tries one finger: it clips two and reports one; the quirk mode
    # reproduces its fit_clipped_powerlaw on the same ESD
    quirky = fit_tail(lam, FitOptions(fix_fingers="clip_xmax", ww_compat=True))
    assert quirky.fit.alpha == fit_powerlaw(lam[:-2]).alpha and quirky.num_fingers == 1
    want = ww_fits["planted"]
    assert (quirky.num_fingers, quirky.raw_alpha) == (
        want["num_fingers"],
        pytest.approx(want["raw_alpha"], rel=REL),
    )
    assert quirky.fit.alpha == pytest.approx(want["alpha"], rel=REL)


def test_xmin_peak_searches_only_near_the_peak() -> None:
    lam = _fingered()
    peak = esd_peak(lam)
    tail = fit_tail(lam, FitOptions(fix_fingers="xmin_peak", xmin_max=2.0 * peak))
    assert tail.fit.ok and 0.95 * peak <= tail.fit.xmin < 2.0 * peak
    bad = fit_tail(lam, FitOptions(fix_fingers="xmin_peak", xmin_max=0.5 * peak))
    assert bad.fit.status == "failed" and "below 0.95 x the ESD peak" in bad.fit.message


def test_fit_option_checks() -> None:
    with pytest.raises(ValidationError, match="fix_fingers must be one of"):
        AnalyzeOptions(fix_fingers="peak")
    with pytest.raises(ValidationError, match="xmax must be >= 1"):
        AnalyzeOptions(xmax=0)
    with pytest.raises(ValidationError, match="finger_thresh must be > 0"):
        FitOptions(finger_thresh=0.0)
    too_many = fit_tail(np.linspace(1, 2, 10), FitOptions(xmax=6))
    assert too_many.fit.status == "failed" and "over half" in too_many.fit.message


def test_cli_fit_flags(minilm_path: Path, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from spectra.cli.main import app

    key = "encoder.layer.0.attention.self.query.weight"
    args = ["report", str(minilm_path), "--include", key, "--format", "json", "--no-cache", "-q"]
    flags = ["--xmax", "-2", "--fix-fingers", "clip_xmax", "--max-fingers", "4"]
    res = CliRunner().invoke(app, [*args, *flags, "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "r" / "metrics.json").read_text())["layers"][0]
    options = AnalyzeOptions(
        include=(key,), device="cpu", xmax=2, fix_fingers="clip_xmax", max_fingers=4
    )
    lib = analyze(minilm_path, options, cache=None).layer(key)
    assert (row["alpha"], row["num_fingers"], row["raw_alpha"]) == (
        lib.alpha,
        lib.num_fingers,
        lib.raw_alpha,
    )
    assert row["xmax"] < lib.sv_max**2  # the top two eigenvalues were dropped
    bad = CliRunner().invoke(app, [*args, "--fix-fingers", "peak", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "fix_fingers must be one of" in bad.output
