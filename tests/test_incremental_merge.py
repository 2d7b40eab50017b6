"""EVA's incremental SVD merge by warm-started subspace iteration (issue 19): the same numbers as
the full-SVD merge it replaces, the same convergence decisions, and the exact float64 PCA of the
stacked activations where the kept components carry the variance."""

from __future__ import annotations

import pytest
import torch
from _adapt_fixtures import one_thread  # noqa: F401

from spectra.adapt import stats
from spectra.adapt.stats import IncrementalSVD, top_right_singular
from spectra.errors import ValidationError

FEATURES = 192


def _rows(seed: int, *, strong: int, tail: float):
    """Rows with a planted spectrum: ``strong`` directions with std 20..5, the rest ``tail``
    times a slowly decaying profile, all rotated by a random orthogonal Q and shifted by 3."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(FEATURES, FEATURES, generator=g, dtype=torch.float64))
    scales = tail * torch.arange(1, FEATURES + 1, dtype=torch.float64) ** -0.5
    scales[:strong] = torch.linspace(20.0, 5.0, strong, dtype=torch.float64)

    def rows(n: int) -> torch.Tensor:
        return (torch.randn(n, FEATURES, generator=g, dtype=torch.float64) * scales) @ Q.T + 3.0

    return rows


def _feed(batches: list[torch.Tensor], k: int, merge: str, **kw) -> tuple[IncrementalSVD, list]:
    svd = IncrementalSVD(k, FEATURES, merge=merge, **kw)
    trace = []
    for x in batches:
        svd.update(x)
        trace.append((svd.iterations, svd.cosines.clone(), svd.converged(), svd.converged(2)))
    return svd, trace


def test_iterated_merge_equals_the_full_svd_merge_and_its_convergence_decisions():
    rows = _rows(0, strong=6, tail=1.0)
    batches = [rows(300) for _ in range(5)]
    fast, fast_trace = _feed(batches, 8, "iterate")
    full, full_trace = _feed(batches, 8, "full")
    # The iterated route really iterated (the stack is 300+ x 192, 24 columns searched).
    assert all(t[0] > 0 for t in fast_trace)
    assert all(t[0] == 0 for t in full_trace)
    a, b = fast.state(), full.state()
    torch.testing.assert_close(a.values, b.values, rtol=1e-9, atol=0)
    assert float((a.components * b.components).sum(1).abs().min()) > 1 - 1e-12
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
    assert a.total_ss == b.total_ss and a.count == b.count
    # EVA's stopping rule sees the same cosines (to 1e-7: a vector's error is its residual,
    # <= MERGE_TOL, over its relative gap, which is small inside the tail) and makes the same
    # decisions after every batch.
    for (_, cos_a, all_a, two_a), (_, cos_b, all_b, two_b) in zip(
        fast_trace, full_trace, strict=True
    ):
        torch.testing.assert_close(cos_a, cos_b, rtol=0, atol=1e-7)
        assert (all_a, two_a) == (all_b, two_b)
    assert fast.converged(6)  # the planted directions converge...
    assert not fast.converged()  # ...the 2 directions inside the flat tail do not


def test_incremental_pca_equals_the_exact_pca_of_the_stacked_activations():
    # Variance concentrated in 10 directions above a small tail: what the truncation to
    # k + spare components keeps is the whole story, so both routes must equal the float64 PCA
    # of all rows at once (tolerances: 1e-6 on |cos|, 1e-6 relative on values and ratios).
    rows = _rows(1, strong=10, tail=0.05)
    batches = [rows(250) for _ in range(6)]
    X = torch.cat(batches)
    centred = X - X.mean(0)
    _, S, Vh = torch.linalg.svd(centred, full_matrices=False)
    exact_evr = S**2 / centred.square().sum()
    for merge in ("iterate", "full"):
        state = _feed(batches, 8, merge)[0].state()
        cos = (state.components * Vh[:8]).sum(1).abs()
        assert float(cos.min()) > 1 - 1e-6, (merge, cos)
        torch.testing.assert_close(state.values, S[:8], rtol=1e-6, atol=0)
        torch.testing.assert_close(
            state.explained_variance_ratio(), exact_evr[:8], rtol=1e-6, atol=0
        )
        torch.testing.assert_close(state.mean, X.mean(0), rtol=1e-12, atol=1e-12)


def test_top_right_singular_is_exact_and_falls_back_to_the_full_svd(monkeypatch):
    g = torch.Generator().manual_seed(3)
    M = torch.randn(400, 160, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 160)
    _, S, Vh = torch.linalg.svd(M, full_matrices=False)
    start = torch.linalg.svd(M[:300], full_matrices=False)[2][:10]
    values, vectors, iterations = top_right_singular(M, 10, start=start)
    assert iterations > 0
    torch.testing.assert_close(values, S[:10], rtol=1e-12, atol=0)
    assert float((vectors * Vh[:10]).sum(1).abs().min()) > 1 - 1e-12
    # No start: the Gram eigenvectors start it (same numbers); a wide M takes the full SVD.
    values, vectors, iterations = top_right_singular(M, 10)
    assert iterations > 0
    torch.testing.assert_close(values, S[:10], rtol=1e-12, atol=0)
    assert float((vectors * Vh[:10]).sum(1).abs().min()) > 1 - 1e-12
    wide_values, _, iterations = top_right_singular(M.T.contiguous(), 10)
    assert iterations == 0
    torch.testing.assert_close(wide_values, S[:10], rtol=1e-12, atol=0)
    # No convergence within the cap: the full SVD (iterations 0), same numbers.
    monkeypatch.setattr(stats, "MERGE_MAX_ITERS", 1)
    values, vectors, iterations = top_right_singular(M, 10, start=torch.eye(160)[:10])
    assert iterations == 0
    torch.testing.assert_close(values, S[:10], rtol=1e-12, atol=0)
    # All-zero input: zero values, no division by zero.
    zeros, _, _ = top_right_singular(torch.zeros(400, 160, dtype=torch.float64), 4, start=start)
    assert not zeros.any()


def test_merge_route_is_validated():
    with pytest.raises(ValidationError, match="merge must be one of"):
        IncrementalSVD(2, 4, merge="fast")
