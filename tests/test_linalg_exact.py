"""Exact spectra: svdvals / gram64 routes and the full SVD against float64 references."""

from __future__ import annotations

import pytest
import torch
from _linalg_fixtures import (
    decaying,
    one_thread,  # noqa: F401 (fixture)
    planted,
)

from spectra.errors import NumericalError, ValidationError
from spectra.linalg.exact import exact_svd, exact_svdvals, gram_left_svd, resolve_route


def _heavy_tailed(m: int, n: int, seed: int) -> torch.Tensor:
    """float32 matrix whose eigenvalues S^2 span ~1e2 down to well below 1e-5."""
    S = 10.0 * decaying(min(m, n), power=2.5)
    return planted(m, n, S, seed=seed).float()


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_gram64_eigenvalues_above_1e5_match_float64_to_1e6(shape: tuple[int, int]) -> None:
    W = _heavy_tailed(*shape, seed=0)
    ref = torch.linalg.svd(W.double(), full_matrices=False)[1].square()
    for route in ("gram64", "auto"):
        ev = exact_svdvals(W, route=route).square()
        assert ev.dtype == torch.float64 and ev.shape == (64,)
        keep = ref > 1e-5
        assert int(keep.sum()) < 64  # the test covers a spectrum that crosses the cut
        rel = ((ev[keep] - ref[keep]).abs() / ref[keep]).max()
        assert float(rel) < 1e-6
        assert bool((ev[:-1] >= ev[1:]).all()) and bool((ev >= 0).all())


def test_float32_svdvals_route_is_not_accurate_in_the_bulk() -> None:
    """Why gram64 is the default: float32 svdvals misses the small eigenvalues by far more."""
    W = _heavy_tailed(96, 64, seed=1)
    ref = torch.linalg.svd(W.double(), full_matrices=False)[1].square()
    ev = exact_svdvals(W, route="svdvals").square()
    keep = ref > 1e-5
    assert float(((ev[keep] - ref[keep]).abs() / ref[keep]).max()) > 1e-6
    assert float((ev[:5] - ref[:5]).abs().div(ref[:5]).max()) < 1e-5


def test_batched_equals_single_and_float64_svdvals() -> None:
    W = torch.stack([_heavy_tailed(40, 30, seed=s) for s in range(3)])
    batch = exact_svdvals(W)
    for i in range(3):
        assert torch.equal(batch[i], exact_svdvals(W[i]))
    S64 = exact_svdvals(W.double(), route="svdvals")
    assert torch.allclose(S64, torch.linalg.svdvals(W.double()), rtol=0, atol=0)


def test_low_precision_input_is_upcast() -> None:
    W = torch.randn(32, 24, generator=torch.Generator().manual_seed(0)).bfloat16()
    S = exact_svdvals(W, route="svdvals")
    assert S.dtype == torch.float64
    assert torch.allclose(S, torch.linalg.svdvals(W.double()), rtol=1e-5)


def test_exact_svd_full_vectors() -> None:
    W = _heavy_tailed(50, 30, seed=2)
    U, S, Vh = exact_svd(W)
    assert U.dtype == torch.float64 and U.shape == (50, 30) and Vh.shape == (30, 30)
    assert torch.allclose((U * S) @ Vh, W.double(), atol=1e-12)
    Uf, _, _ = exact_svd(W, full_matrices=True)
    assert Uf.shape == (50, 50)
    U32, S32, _ = exact_svd(torch.stack([W, W]), dtype=torch.float32)
    assert U32.dtype == torch.float32 and S32.shape == (2, 30)


def test_route_and_input_errors() -> None:
    with pytest.raises(ValidationError, match="got 'fast'"):
        exact_svdvals(torch.randn(4, 4), route="fast")
    with pytest.raises(ValidationError, match="got dtype torch.int64"):
        exact_svdvals(torch.ones(4, 4, dtype=torch.long))
    with pytest.raises(ValidationError, match="empty"):
        exact_svd(torch.empty(0, 3))
    W = torch.randn(4, 4)
    W[0, 0] = float("inf")
    with pytest.raises(NumericalError, match="'emb'"):
        exact_svdvals(W, names=["emb"])
    assert resolve_route("auto", torch.device("mps")) == "svdvals"
    assert resolve_route("auto", torch.device("cpu")) == "gram64"


pytestmark = pytest.mark.usefixtures("one_thread")


# -- the gram64 route never makes a full float64 copy of a large W ------------------------------
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((3, 300, 40), torch.float32), ((2, 40, 300), torch.float32), ((1, 257, 64), torch.bfloat16)],
)
def test_sliced_gram_equals_the_one_product_route_to_1e12(
    shape: tuple[int, int, int], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slices of the long side (forced small here) give the one-product route's values to
    1e-12 relative, every singular value, for float32 and bf16 inputs (upcast exactly)."""
    from spectra.linalg import exact

    W = _heavy_tailed(shape[1], shape[2], seed=3).expand(shape).contiguous()
    W = (W + 0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(4))).to(dtype)
    one_product = exact.gram_svdvals(W)  # 8 * b * m * n bytes < 64 MiB: one product
    assert exact.gram_block(tuple(W.shape)) is None
    slice_bytes = 8 * shape[0] * min(shape[1:]) * 7  # 7 rows/columns per slice
    monkeypatch.setattr(exact, "GRAM_SLICE_BYTES", slice_bytes)
    assert exact.gram_block(tuple(W.shape)) == 7
    sliced = exact.gram_svdvals(W)
    assert sliced.dtype == torch.float64 and sliced.shape == one_product.shape
    torch.testing.assert_close(sliced, one_product, rtol=1e-12, atol=0)
    reference = torch.linalg.svdvals(W.double())
    torch.testing.assert_close(sliced, reference, rtol=1e-9, atol=1e-12)
    # lower triangle only, in column panels (uneven: 40 = 16 + 16 + 8), sliced and whole
    monkeypatch.setattr(exact, "GRAM_PANEL", 16)
    torch.testing.assert_close(exact.gram_svdvals(W), one_product, rtol=1e-12, atol=0)
    monkeypatch.setattr(exact, "GRAM_SLICE_BYTES", 64 << 20)
    torch.testing.assert_close(exact.gram_svdvals(W), one_product, rtol=1e-12, atol=0)
    G = exact._chunked_gram(W, max(shape[1:]), W.device)
    full = W.double().mT @ W.double() if shape[1] >= shape[2] else W.double() @ W.double().mT
    torch.testing.assert_close(G.tril(), full.tril(), rtol=1e-12, atol=1e-12)


def test_gram_slices_stay_under_64_mib_for_large_matrices() -> None:
    from spectra.linalg.exact import GRAM_SLICE_BYTES, gram_block

    assert GRAM_SLICE_BYTES == 64 << 20
    for shape, rows in (((1, 32000, 4096), 2048), ((1, 4096, 11008), 2048), ((4, 4096, 4096), 512)):
        assert gram_block(shape) == rows
        assert 8 * shape[0] * rows * min(shape[1:]) <= GRAM_SLICE_BYTES
    assert gram_block((1, 2048, 2048)) is None  # 32 MiB of float64: one product
    assert gram_block((1, 4096, 2049)) == 4094  # just over 64 MiB: two slices
    assert gram_block((30, 384, 384)) is None and gram_block((1, 10**7, 1)) == 8 << 20


@pytest.mark.parametrize("shape", [(60, 60), (40, 90), (90, 40), (1, 30), (30, 1)])
def test_gram_left_svd_matches_the_float64_svd(shape: tuple[int, int]) -> None:
    """Values to 1e-12 relative to S_1; each left vector equals the SVD's up to sign (planted,
    well-separated spectrum, so every vector is defined); U orthonormal even when tall."""
    g = torch.Generator().manual_seed(7)
    m, n = shape
    k = min(m, n)
    q_l = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    q_r = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    s_true = torch.linspace(10.0, 1.0, k, dtype=torch.float64)
    w = ((q_l * s_true) @ q_r.mT).to(torch.float32).to(torch.float64)  # exact in float32
    u_ref, s_ref, _ = torch.linalg.svd(w, full_matrices=False)
    u, s = gram_left_svd(w.to(torch.float32))  # float32 input is upcast exactly
    assert u.dtype == torch.float64 and u.shape == (m, k)
    assert torch.allclose(s, s_ref, rtol=0, atol=1e-12 * float(s_ref[0]))
    cos = (u_ref.mT @ gram_left_svd(w)[0]).diagonal().abs()
    assert torch.allclose(cos, torch.ones_like(cos), rtol=0, atol=1e-10)
    assert torch.allclose(u.mT @ u, torch.eye(k, dtype=torch.float64), atol=1e-6)
    top = gram_left_svd(w, top=3)[0]
    assert top.shape == (m, min(3, k))
    full = gram_left_svd(w)[0][:, : min(3, k)]  # all vectors vs only the top: equal up to sign
    assert torch.allclose((top * full).sum(0).abs(), torch.ones(min(3, k), dtype=torch.float64))
