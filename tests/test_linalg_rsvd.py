"""Randomized SVD against float64 `torch.linalg.svd` on planted spectra and the real MiniLM."""

from __future__ import annotations

import pytest
import torch
from _linalg_fixtures import (
    decaying,
    flat_top,
    one_thread,  # noqa: F401 (fixture)
    planted,
    rel_err,
    worst_cosine,
)
from safetensors import safe_open

from spectra.errors import NumericalError, ValidationError
from spectra.linalg.rsvd import RSVDOptions, gaussian_sketch, randomized_svd, randomized_svd_info


@pytest.mark.parametrize("method", ["krylov", "subspace"])
@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_decaying_topk_values_within_1e4(method: str, shape: tuple[int, int]) -> None:
    W64 = planted(*shape, decaying(200), seed=1)
    U_ref, S_ref, _ = torch.linalg.svd(W64, full_matrices=False)
    res = randomized_svd_info(W64.float(), 16, RSVDOptions(method=method))
    assert res.S.dtype == torch.float32 and res.U.shape == (1, shape[0], 16)
    assert rel_err(res.S[0], S_ref[:16]) < 1e-4
    assert worst_cosine(res.U[0], U_ref[:, :16]) > 0.999
    assert bool(res.converged.all())
    assert float(res.residual[0]) < 1e-2


def test_factors_are_orthonormal_and_reconstruct_top_k() -> None:
    W = planted(150, 120, decaying(120, power=1.0), seed=2)
    U, S, Vh = randomized_svd(W, 10, RSVDOptions(tol=1e-10), dtype=torch.float64)
    eye = torch.eye(10, dtype=torch.float64)
    assert torch.allclose(U.T @ U, eye, atol=1e-10) and torch.allclose(Vh @ Vh.T, eye, atol=1e-10)
    U_ref, S_ref, Vh_ref = torch.linalg.svd(W, full_matrices=False)
    best = (U_ref[:, :10] * S_ref[:10]) @ Vh_ref[:10]
    assert torch.allclose((U * S) @ Vh, best, atol=1e-12)


def test_flat_top_krylov_reaches_the_subspace_bound() -> None:
    W64 = planted(256, 384, flat_top(256), seed=3)
    U_ref, S_ref, _ = torch.linalg.svd(W64, full_matrices=False)
    res = randomized_svd_info(W64.float(), 16)
    assert worst_cosine(res.U[0], U_ref[:, :16]) >= 0.99
    assert rel_err(res.S[0], S_ref[:16]) < 1e-4
    assert int(res.iterations[0]) >= 2  # a flat top needs more than one pass to settle


def test_negative_control_no_power_iterations_on_flat_spectrum_misses() -> None:
    W64 = planted(256, 384, flat_top(256), seed=3)
    U_ref, S_ref, _ = torch.linalg.svd(W64, full_matrices=False)
    res = randomized_svd_info(W64.float(), 16, RSVDOptions(power_iters=0, method="subspace"))
    assert rel_err(res.S[0], S_ref[:16]) > 1e-4
    assert worst_cosine(res.U[0], U_ref[:, :16]) < 0.99
    # and the accuracy estimate says so: far above a converged run's
    good = randomized_svd_info(W64.float(), 16)
    assert float(res.residual[0]) > 5 * float(good.residual[0])


def test_deterministic_across_runs_and_batch_composition() -> None:
    mats = torch.stack([planted(120, 90, flat_top(90, seed=s), seed=s) for s in range(5)]).float()
    full = randomized_svd_info(mats, 8, RSVDOptions(seed=7))
    again = randomized_svd_info(mats, 8, RSVDOptions(seed=7))
    assert torch.equal(full.U, again.U) and torch.equal(full.S, again.S)
    for i in range(5):
        alone = randomized_svd_info(mats[i], 8, RSVDOptions(seed=7))
        assert torch.equal(alone.S[0], full.S[i]) and torch.equal(alone.U[0], full.U[i])
        assert torch.equal(alone.Vh[0], full.Vh[i])
        assert int(alone.iterations[0]) == int(full.iterations[i])
    pair = randomized_svd_info(mats[[3, 1]], 8, RSVDOptions(seed=7))
    assert torch.equal(pair.S[0], full.S[3]) and torch.equal(pair.U[1], full.U[1])
    other_seed = randomized_svd_info(mats[0], 8, RSVDOptions(seed=8))
    assert not torch.equal(other_seed.U[0], full.U[0])


def test_fixed_power_iters_and_full_krylov_basis_is_exact() -> None:
    W = planted(50, 40, decaying(40), seed=4)
    res = randomized_svd_info(W, 30, RSVDOptions(power_iters=3), dtype=torch.float64)
    # block 40 = min(m, n): the basis spans the range at once, so the result is exact
    assert torch.allclose(res.S[0], torch.linalg.svdvals(W)[:30], rtol=1e-10)
    assert int(res.iterations[0]) == 0 and bool(res.converged[0])
    sub = randomized_svd_info(
        W, 5, RSVDOptions(power_iters=2, method="subspace"), dtype=torch.float64
    )
    assert int(sub.iterations[0]) == 2


def test_sketch_is_seeded_on_cpu() -> None:
    a = gaussian_sketch(30, 4, seed=3, dtype=torch.float32)
    b = gaussian_sketch(30, 4, seed=3, dtype=torch.float32)
    assert torch.equal(a, b) and a.shape == (30, 4)


def test_zero_matrix_converges_to_zero() -> None:
    res = randomized_svd_info(torch.zeros(20, 30), 3)
    assert torch.equal(res.S[0], torch.zeros(3)) and bool(res.converged[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be in \\[1, 20\\], got 0"),
        ({"k": 21}, "k must be in \\[1, 20\\], got 21"),
        ({"k": 2.5}, "k must be an integer, got 2.5"),
        ({"k": 3, "oversample": -1}, "oversample must be >= 0, got -1"),
        ({"k": 3, "method": "lanczos"}, "got 'lanczos'"),
        ({"k": 3, "power_iters": -2}, "power_iters must be >= 0, got -2"),
        ({"k": 3, "tol": 0.0}, "tol must be a number in \\(0, 1\\), got 0.0"),
        ({"k": 3, "dtype": torch.float16}, "got torch.float16"),
    ],
)
def test_bad_arguments_echo_the_value(kwargs: dict, match: str) -> None:
    W = torch.randn(20, 30)
    knobs = {n: kwargs.pop(n) for n in list(kwargs) if n in RSVDOptions.__dataclass_fields__}
    with pytest.raises(ValidationError, match=match):
        randomized_svd(W, kwargs.pop("k"), RSVDOptions(**knobs), **kwargs)


def test_bad_shapes_and_non_finite() -> None:
    with pytest.raises(ValidationError, match="got 1-D shape \\(5,\\)"):
        randomized_svd(torch.randn(5), 1)
    with pytest.raises(ValidationError, match="4-D"):
        randomized_svd(torch.randn(2, 2, 3, 3), 1)
    W = torch.randn(3, 10, 12)
    W[2, 1, 1] = float("nan")
    with pytest.raises(NumericalError, match="'layer.2.q'.*1 NaN/Inf entries of 120"):
        randomized_svd(W, 2, names=["a", "b", "layer.2.q"])
    with pytest.raises(NumericalError, match="batch index 2"):
        randomized_svd(W, 2)


def _minilm_matrices(path, limit: int) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            if name.endswith(".weight") and "encoder.layer" in name:
                t = f.get_tensor(name)
                if t.ndim == 2 and name.split(".")[2] in {"0", "5"}:
                    out[name] = t.float()
    return dict(list(out.items())[:limit])


def test_minilm_top16_subspace_cosine_and_peft_contrast(minilm_path) -> None:
    mats = _minilm_matrices(minilm_path, 12)
    assert len(mats) == 12
    worst_ours, worst_peft = 1.0, 1.0
    for W in mats.values():
        U_ref = torch.linalg.svd(W.double(), full_matrices=False)[0][:, :16]
        ours = randomized_svd_info(W, 16)
        worst_ours = min(worst_ours, worst_cosine(ours.U[0], U_ref))
        torch.manual_seed(0)
        U_p = torch.svd_lowrank(W, q=8, niter=4)[0]  # PEFT's pissa_niter_4 call, r = 8
        worst_peft = min(worst_peft, worst_cosine(U_p, U_ref[:, :8]))
    assert worst_ours >= 0.99
    assert worst_peft < 0.9  # the contrast the issue asks for: PEFT's setting is far off


pytestmark = pytest.mark.usefixtures("one_thread")
