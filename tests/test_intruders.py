"""Intruder dimensions: planted answers and a float64 brute-force reference."""

from __future__ import annotations

import math

import pytest
import torch

from spectra.analysis.intruders import (
    IntruderResult,
    intruder_dimensions,
    max_abs_cosine,
    validate_epsilons,
)
from spectra.errors import ValidationError


def _orth(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    return q


def _matrix(m: int, n: int, s: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return _orth(m, len(s), gen) @ torch.diag(s) @ _orth(n, len(s), gen).T


def _reference(w_ft: torch.Tensor, w_base: torch.Tensor, k: int, eps: float) -> tuple:
    """Loop-by-loop definition from the paper, float64, full SVDs."""
    u_ft = torch.linalg.svd(w_ft, full_matrices=False)[0]
    u_b = torch.linalg.svd(w_base, full_matrices=False)[0]
    mc = []
    for i in range(k):
        mc.append(max(abs(float(u_ft[:, i] @ u_b[:, j])) for j in range(u_b.shape[1])))
    return mc, sum(c < eps for c in mc)


def test_planted_rank1_intruder_is_the_only_one() -> None:
    gen = torch.Generator().manual_seed(0)
    m = n = 48
    s = torch.linspace(3.0, 0.1, n, dtype=torch.float64)
    u0, v0 = _orth(m, m, gen), _orth(n, n, gen)
    w0 = u0 @ torch.diag(s) @ v0.T
    # Direction orthogonal to the base's top-10 subspace, an even mix of the bottom ones,
    # with a singular value larger than S_1 of the base.
    u_dir = u0[:, 10:].sum(1) / math.sqrt(m - 10)
    v_dir = v0[:, 10:].sum(1) / math.sqrt(n - 10)
    w_ft = w0 + 5.0 * torch.outer(u_dir, v_dir)
    u_ft = torch.linalg.svd(w_ft)[0]
    res = intruder_dimensions(u_ft[:, :10], torch.linalg.svd(w0)[0], (0.5, 0.9))
    ref_mc, ref_count = _reference(w_ft, w0, 10, 0.5)
    assert res.counts[0.5] == 1 == ref_count
    assert res.intruder_indices(0.5) == (0,)  # the planted direction is now the top one
    torch.testing.assert_close(torch.tensor(res.max_cos), torch.tensor(ref_mc), rtol=0, atol=1e-12)
    assert res.counts[0.9] >= res.counts[0.5]
    assert res.floor == pytest.approx(1 / math.sqrt(m))
    assert all(c >= res.floor - 1e-12 for c in res.max_cos)


def test_small_dense_update_has_no_intruders() -> None:
    gen = torch.Generator().manual_seed(1)
    m, n = 40, 64
    w0 = _matrix(m, n, torch.linspace(4.0, 0.5, m, dtype=torch.float64), gen)
    w_ft = w0 + 1e-3 * torch.randn(m, n, generator=gen, dtype=torch.float64)
    res = intruder_dimensions(
        torch.linalg.svd(w_ft)[0][:, :10], torch.linalg.svd(w0)[0], (0.5, 0.6, 0.7, 0.8, 0.9)
    )
    assert all(v == 0 for v in res.counts.values())
    assert min(res.max_cos) > 0.99
    assert _reference(w_ft, w0, 10, 0.9)[1] == 0


@pytest.mark.parametrize("seed", [2, 3])
def test_matches_bruteforce_reference_on_random_pairs(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    m, n = 30, 20
    w0 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    w_ft = w0 + 0.8 * torch.randn(m, 3, generator=gen, dtype=torch.float64) @ torch.randn(
        3, n, generator=gen, dtype=torch.float64
    )
    res = intruder_dimensions(
        torch.linalg.svd(w_ft, full_matrices=False)[0][:, :8],
        torch.linalg.svd(w0, full_matrices=False)[0],
        (0.7,),
    )
    ref_mc, ref_count = _reference(w_ft, w0, 8, 0.7)
    assert res.counts == {0.7: ref_count}
    assert max(abs(a - b) for a, b in zip(res.max_cos, ref_mc, strict=True)) < 1e-12
    assert res.basis_size == n  # thin U of a tall matrix


def test_sign_flips_do_not_change_the_result() -> None:
    gen = torch.Generator().manual_seed(4)
    u_b = _orth(16, 16, gen)
    u_f = _orth(16, 5, gen)
    a = max_abs_cosine(u_f, u_b)
    b = max_abs_cosine(-u_f, u_b * torch.tensor([(-1.0) ** i for i in range(16)]))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_identical_subspaces_give_cosine_one_and_no_intruders() -> None:
    u = torch.eye(6, dtype=torch.float64)
    res = intruder_dimensions(u[:, [2, 0]], u, (0.5,))
    assert res.max_cos == (1.0, 1.0) and res.counts == {0.5: 0}
    assert res.to_dict()["counts"] == {"0.5": 0}


def test_errors_echo_bad_input() -> None:
    u = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValidationError, match=r"\(5, 2\)"):
        intruder_dimensions(torch.zeros(5, 2), u)
    with pytest.raises(ValidationError, match="1.5"):
        validate_epsilons([0.5, 1.5])
    with pytest.raises(ValidationError, match="at least one"):
        validate_epsilons([])
    res = IntruderResult(max_cos=(0.3,), counts={0.5: 1})
    with pytest.raises(ValidationError, match="0.7"):
        res.count(0.7)
    assert res.count(0.5) == 1


def test_epsilons_are_sorted_and_deduplicated() -> None:
    assert validate_epsilons([0.9, 0.5, 0.5]) == (0.5, 0.9)
