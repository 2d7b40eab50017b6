"""factorize(), residual and the SVD/QR initializers against float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from _adapt_fixtures import one_thread  # noqa: F401

from spectra.adapt.factorize import factorize, reconstruction_error, residual
from spectra.adapt.registry import (
    INITIALIZERS,
    Factors,
    InitContext,
    check_factors,
    get_initializer,
    register_initializer,
)
from spectra.adapt.svd import use_exact
from spectra.errors import ValidationError
from spectra.formats.peft import lora_scale
from spectra.linalg.exact import exact_svd_slice, gram_eigh


def _known_spectrum(m: int, n: int, S: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, S.numel(), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, S.numel(), generator=g, dtype=torch.float64))
    return U @ torch.diag(S) @ V.T


def _projector(X: torch.Tensor) -> torch.Tensor:
    Q, _ = torch.linalg.qr(X.to(torch.float64))
    return Q @ Q.T


@pytest.mark.parametrize(("alpha", "r", "rs", "want"), [(16, 16, False, 1.0), (8, 4, True, 4.0)])
def test_lora_scale(alpha: float, r: int, rs: bool, want: float) -> None:
    assert lora_scale(alpha, r, rslora=rs) == want


@pytest.mark.parametrize("bad", [(0, 4), (8, 0), (float("nan"), 4), (-1, 4)])
def test_lora_scale_rejects(bad: tuple[float, int]) -> None:
    """No initializer factors with alpha <= 0, a rank <= 0 or a NaN alpha. The scale rule itself
    is PEFT's (alpha 0 reads as a zero update, see tests/test_formats_peft.py), so alpha <= 0 is
    refused where factors are made."""
    U, S, Vh = torch.linalg.svd(torch.randn(6, 5, dtype=torch.float64), full_matrices=False)
    with pytest.raises(ValidationError):
        factorize(U[:, :2], S[:2], Vh[:2], lora_scale(bad[0], bad[1]))


@pytest.mark.parametrize("scale", [1.0, 0.25, 3.0])
def test_factorize_reproduces_the_slice_with_balanced_factors(scale: float) -> None:
    W = torch.randn(12, 7, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    A, B = factorize(U[:, :3], S[:3], Vh[:3], scale)
    torch.testing.assert_close(scale * B @ A, U[:, :3] @ torch.diag(S[:3]) @ Vh[:3])
    # Balanced: column norms of B equal row norms of A, both sqrt(S / scale).
    torch.testing.assert_close(B.norm(dim=0), torch.sqrt(S[:3] / scale))
    torch.testing.assert_close(A.norm(dim=1), torch.sqrt(S[:3] / scale))


def test_factorize_batched_and_shape_errors() -> None:
    W = torch.randn(3, 6, 5, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    A, B = factorize(U[..., :2], S[..., :2], Vh[..., :2, :], 2.0)
    assert A.shape == (3, 2, 5) and B.shape == (3, 6, 2)
    torch.testing.assert_close(
        2.0 * B @ A, U[..., :2] @ torch.diag_embed(S[..., :2]) @ Vh[..., :2, :]
    )
    with pytest.raises(ValidationError, match="disagree on the rank"):
        factorize(U[..., :2], S[..., :3], Vh[..., :2, :], 1.0)
    with pytest.raises(ValidationError, match="scale"):
        factorize(U[..., :2], S[..., :2], Vh[..., :2, :], 0.0)


def test_residual_is_exact_subtraction_and_error_is_measured_after_the_cast() -> None:
    W = torch.randn(16, 8)
    A, B = torch.randn(2, 8), torch.randn(16, 2)
    R = residual(W, A, B, 0.5, dtype=torch.float32)
    want = (W.double() - 0.5 * B.double() @ A.double()).float()
    assert torch.equal(R, want)
    assert reconstruction_error(W, R, A, B, 0.5) < 1e-7
    Rb = residual(W, A, B, 0.5, dtype=torch.bfloat16)
    assert Rb.dtype == torch.bfloat16
    assert 1e-4 < reconstruction_error(W, Rb, A, B, 0.5) < 1e-2  # bf16 rounding shows
    # Unchanged base (EVA-style B = 0): the error is the adapter's own size.
    assert reconstruction_error(W, None, A, torch.zeros_like(B), 1.0) == 0.0


def _ctx(svd: str = "exact") -> InitContext:
    return InitContext(key="w.weight", module="w", svd=svd)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["pissa", "milora"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_svd_initializers_take_the_right_components(method: str, scale: float) -> None:
    S = torch.tensor([9.0, 7.0, 5.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.8, 0.5, 0.3, 0.1]).double()
    W64 = _known_spectrum(20, 12, S)
    r = 3
    f = get_initializer(method).init(W64.float(), r, scale, _ctx())
    check_factors(f, (20, 12), r, method)
    U, S_ref, Vh = torch.linalg.svd(W64, full_matrices=False)
    sl = slice(0, r) if method == "pissa" else slice(S.numel() - r, S.numel())
    want = U[:, sl] @ torch.diag(S_ref[sl]) @ Vh[sl]
    got = scale * f.B.double() @ f.A.double()
    assert torch.linalg.matrix_norm(got - want) / torch.linalg.matrix_norm(want) < 1e-5
    # A spans the chosen right subspace, B the chosen left subspace.
    assert torch.allclose(_projector(f.A.T), _projector(Vh[sl].T), atol=1e-5)
    assert torch.allclose(_projector(f.B), _projector(U[:, sl]), atol=1e-5)


def test_milora_bottom_subspace_on_a_wide_matrix_against_float64_svd() -> None:
    g = torch.Generator().manual_seed(3)
    W = torch.randn(24, 40, generator=g)
    f = get_initializer("milora").init(W, 4, 1.0, _ctx())
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    assert torch.allclose(_projector(f.B), _projector(U[:, -4:]), atol=1e-5)
    assert torch.allclose(_projector(f.A.T), _projector(Vh[-4:].T), atol=1e-5)
    # Negative control: the top subspace is far from the bottom one.
    assert not torch.allclose(_projector(f.B), _projector(U[:, :4]), atol=1e-2)


@pytest.mark.parametrize("shape", [(10, 6), (6, 10)])
def test_olora_is_qr_without_scale(shape: tuple[int, int]) -> None:
    W = torch.randn(*shape, dtype=torch.float64)
    f = get_initializer("olora").init(W.float(), 3, 2.0, _ctx())
    Q, R = torch.linalg.qr(W)
    torch.testing.assert_close(f.B.double(), Q[:, :3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f.A.double(), R[:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        f.B.T.double() @ f.B.double(), torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0
    )
    # the tall route's in-place QR (one float64 buffer) gives torch.linalg.qr's bits
    q, r = torch.linalg.qr(W.float().double())
    assert torch.equal(f.B, q[:, :3].float()) and torch.equal(f.A, r[:3].float())


def test_pissa_randomized_route_meets_the_subspace_bar() -> None:
    S = torch.cat([torch.linspace(10, 9, 8), torch.linspace(3, 0.1, 56)]).double()
    W = _known_spectrum(300, 200, S, seed=1).float()
    f = get_initializer("pissa").init(W, 8, 1.0, _ctx("randomized"))
    assert f.info["svd"] == "randomized"
    U, _, _ = torch.linalg.svd(W.double(), full_matrices=False)
    Qb, _ = torch.linalg.qr(f.B.double())
    cos = torch.linalg.svdvals(U[:, :8].T @ Qb)
    assert float(cos.min()) >= 0.99


def test_auto_svd_choice() -> None:
    assert use_exact((384, 1536), 16, "auto")
    assert not use_exact((4096, 4096), 16, "auto")
    assert use_exact((4096, 4096), 2048, "auto")  # a big share of the rank: exact
    assert use_exact((4096, 4096), 16, "exact")
    assert not use_exact((10, 10), 2, "randomized")


def test_registry_lookup_errors_and_new_initializer() -> None:
    with pytest.raises(ValidationError, match="unknown method 'nope'.*milora.*olora.*pissa"):
        get_initializer("nope")
    assert get_initializer("PiSSA").name == "pissa"

    class Zero:
        name = "test-zero"
        mutates_base = False
        needs_calibration = False
        description = "B = 0"

        def init(self, W, rank, scale, ctx):  # noqa: ANN001, ANN201
            return Factors(torch.randn(rank, W.shape[1]), torch.zeros(W.shape[0], rank))

    register_initializer(Zero())
    try:
        f = get_initializer("test-zero").init(torch.ones(4, 3), 2, 1.0, _ctx())
        check_factors(f, (4, 3), 2, "test-zero")
        with pytest.raises(ValidationError, match=r"expected \(3, 3\)"):
            check_factors(f, (4, 3), 3, "test-zero")
    finally:
        INITIALIZERS.pop("test-zero")


def test_check_factors_rejects_nan() -> None:
    f = Factors(torch.tensor([[math.nan, 0.0]]), torch.zeros(2, 1))
    with pytest.raises(ValidationError, match="NaN"):
        check_factors(f, (2, 2), 1, "x")


@pytest.mark.parametrize("rank", [3, 12])  # a slice of the eigenpairs, and all of them (12 = M)
@pytest.mark.parametrize("which", ["top", "bottom"])
@pytest.mark.parametrize("shape", [(30, 12), (12, 30)])
def test_exact_slice_gram_route_matches_float64_svd(
    which: str, shape: tuple[int, int], rank: int
) -> None:
    S = torch.logspace(1, -2, 12, dtype=torch.float64)
    W = _known_spectrum(*shape, S, seed=4)
    U, S_got, Vh, route = exact_svd_slice(W, rank, which)
    assert route == "gram64"
    sl = slice(0, rank) if which == "top" else slice(12 - rank, 12)
    torch.testing.assert_close(S_got, S[sl], rtol=1e-9, atol=0)
    Ur, _, Vhr = torch.linalg.svd(W, full_matrices=False)
    assert torch.allclose(_projector(U), _projector(Ur[:, sl]), atol=1e-8)
    assert torch.allclose(_projector(Vh.T), _projector(Vhr[sl].T), atol=1e-8)


def test_exact_slice_falls_back_to_the_svd_when_rank_deficient() -> None:
    W = _known_spectrum(20, 12, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    U, S, Vh, route = exact_svd_slice(W, 2, "bottom")
    assert route == "svd64" and float(S.max()) < 1e-12
    assert torch.allclose(U.T @ U, torch.eye(2, dtype=torch.float64), atol=1e-10)


def _slice_holding_one_upcast(W: torch.Tensor, rank: int, which: str) -> tuple[torch.Tensor, ...]:
    """exact_svd_slice's gram64 route as it was before its upcast was dropped during the
    eigendecomposition: one float64 copy of W held throughout (the reference for the bits)."""
    W64 = W.double()
    wide = W64.shape[0] < W64.shape[1]
    G = W64 @ W64.T if wide else W64.T @ W64
    S_all, vecs = gram_eigh(G, rank, which=which)
    M = int(G.shape[0])
    S = (S_all[:rank] if which == "top" else S_all[M - rank :]).clone()
    if wide:
        return vecs, S, (vecs.T @ W64) / S.unsqueeze(1)
    return (W64 @ vecs) / S, S, vecs.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("which", ["top", "bottom"])
@pytest.mark.parametrize("shape", [(700, 90), (90, 700)])
def test_exact_slice_and_milora_give_the_one_upcast_route_bit_for_bit(
    dtype: torch.dtype, which: str, shape: tuple[int, int]
) -> None:
    """Making W's float64 upcast twice (the Gram product, then the other side) instead of holding
    one through the eigendecomposition changes no bit: U, S, Vh, and MiLoRA's (and exact
    PiSSA's) A and B, are torch.equal to the one-upcast route's, for every input dtype."""
    S = torch.logspace(1, -1, 90, dtype=torch.float64)
    W = _known_spectrum(*shape, S, seed=6).to(dtype)
    U, S_got, Vh, route = exact_svd_slice(W, 5, which)
    ref = _slice_holding_one_upcast(W, 5, which)
    assert route == "gram64"
    assert all(torch.equal(a, b) for a, b in zip((U, S_got, Vh), ref, strict=True))
    A_ref, B_ref = factorize(*ref, 0.5)
    method = "milora" if which == "bottom" else "pissa"
    f = get_initializer(method).init(W, 5, 0.5, _ctx())
    assert torch.equal(f.A, A_ref.float()) and torch.equal(f.B, B_ref.float())
