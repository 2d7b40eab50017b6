"""best_fit (likelihood-ratio choice of distribution) and its fits against the powerlaw
package's distribution_compare, run in the test on the bundled MiniLM's WeightWatcher layers,
plus planted samples (docs/methods.md section 2g)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from _ww_fixtures import WW_LAYERS

from spectra.analysis.best_fit import P_SIGNIFICANT, best_fit
from spectra.analysis.powerlaw import fit_powerlaw
from spectra.jobs.report import AnalyzeOptions, analyze

powerlaw = pytest.importorskip("powerlaw")
RANGES = {"alpha": [-10, 30]}  # powerlaw's default alpha range [0, 3] clamps ESD tails


@pytest.fixture(scope="module")
def analysis(minilm_path: Path):
    options = AnalyzeOptions(
        include=tuple(WW_LAYERS.values()), device="cpu", outliers=False, best_fit=True
    )
    return analyze(minilm_path, options, cache=None)


def test_best_fit_equals_powerlaw_distribution_compare(analysis) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lm in analysis.layers:
            lam = analysis.esds[lm.key]
            nz = np.sort(lam[lam > 1e-5])
            assert lm.xmin == fit_powerlaw(nz).xmin
            tail = nz[nz >= lm.xmin]
            ours = best_fit(tail)
            assert ours is not None and lm.best_fit == ours.best
            fit = powerlaw.Fit(nz, xmin=lm.xmin, parameter_ranges=RANGES, verbose=0)
            for name in ours.parameters:  # ours is the likelihood maximum
                theirs_ll = float(np.sum(getattr(fit, name).loglikelihoods(tail)))
                assert ours.loglikelihoods[name] >= theirs_ll - 1e-9 * abs(theirs_ll), name
            # at our parameters, powerlaw's likelihoods and likelihood ratios are ours
            per_point = {}
            for name, params in ours.parameters.items():
                dist = getattr(fit, name)
                dist.set_parameters([max(p, 1e-15) if name != "lognormal" else p for p in params])
                per_point[name] = dist.loglikelihoods(tail)
                assert float(np.sum(per_point[name])) == pytest.approx(
                    ours.loglikelihoods[name], rel=1e-9
                ), (lm.key, name)
            for c in ours.comparisons:
                R, p = powerlaw.loglikelihood_ratio(
                    per_point["power_law"],
                    per_point[c.alternative],
                    nested=c.alternative == "truncated_power_law",
                    normalized_ratio=True,
                )
                if (
                    c.alternative == "truncated_power_law"
                    and ours.parameters[c.alternative][1] == 0
                ):
                    # Lambda = 0: the TPL is the power law, R is rounding (~1e-6) either way
                    assert abs(c.R) < 1e-4 and abs(R) < 1e-4 and c.p > 0.99
                    continue
                assert (c.R, c.p) == (
                    pytest.approx(R, rel=1e-6, abs=1e-9),
                    pytest.approx(p, rel=1e-6, abs=1e-12),
                ), (lm.key, c)
                # and powerlaw's own comparison (its tol=1e-4 fits) draws the same conclusion
                R2, p2 = fit.distribution_compare("power_law", c.alternative, normalized_ratio=True)
                assert (R2 < 0 and p2 < P_SIGNIFICANT) == (c.R < 0 and c.p < P_SIGNIFICANT)
    chosen = {lm.key: lm.best_fit for lm in analysis.layers}
    # the query layer's tail bends away from a power law; the others do not significantly
    assert chosen["encoder.layer.0.attention.self.query.weight"] == "truncated_power_law"
    assert chosen["encoder.layer.0.output.dense.weight"] == "power_law"


@pytest.mark.parametrize(
    ("name", "draw"),
    [
        ("power_law", lambda rng: rng.pareto(1.5, 3000) + 1.0),
        ("exponential", lambda rng: 1.0 + rng.exponential(2.0, 3000)),
        ("lognormal", lambda rng: rng.lognormal(0.0, 1.0, 3000)),
    ],
)
def test_best_fit_finds_a_planted_distribution(name: str, draw) -> None:
    x = np.sort(draw(np.random.default_rng(0)))
    if name == "lognormal":
        x = x[x >= 0.1]  # its tail from 0.1 (from its median up, a TPL fits it as well)
    found = best_fit(x)
    assert found is not None and found.best == name, found


def test_best_fit_needs_a_tail() -> None:
    assert best_fit(np.array([2.0, 2.0, 2.0])) is None
    assert best_fit(np.array([1.0])) is None
