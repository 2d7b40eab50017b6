"""compare's memory-bounded routes give the numbers of the whole-matrix float64 routes.

compare_pair takes its inputs in their stored dtype and upcasts slices; the update's Gram matrix
is summed over slices of W_ft - W_base; a tall base's QR runs in one float64 buffer that becomes
U row block by row block. Each is checked here against the route it replaced (bit for bit where
the arithmetic is the same, to 1e-12 where only the summation order differs) and against float64
references; compare.json is the same bytes with and without the spectrum cache. Slice sizes
are forced small (GRAM_SLICE_BYTES, the cache's PAYLOAD_BLOCK_BYTES patched) so small matrices
take the sliced paths. Peak memory itself is measured in benchmarks/bench_memory.py (RSS is not
deterministic enough for a test).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import spectra.analysis.pair as pair_mod
import spectra.linalg.cache as cache_mod
from spectra.analysis.pair import compare_pair
from spectra.cli.main import app
from spectra.linalg import exact


def _pair(m: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 base with a decaying spectrum and a fine-tune = base + rank-3 update + noise."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    left = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    w0 = (left * torch.logspace(1, -1, k, dtype=torch.float64)) @ right.mT
    f64 = torch.float64
    update = torch.randn(m, 3, generator=g, dtype=f64) @ torch.randn(3, n, generator=g, dtype=f64)
    w1 = w0 + 0.05 * update + 1e-3 * torch.randn(m, n, generator=g, dtype=torch.float64)
    return w0.float(), w1.float()


def _small_slices(monkeypatch: pytest.MonkeyPatch, n: int, rows: int) -> None:
    """Slices of `rows` rows of an n-column float64 matrix in every sliced route."""
    monkeypatch.setattr(exact, "GRAM_SLICE_BYTES", 8 * n * rows)
    monkeypatch.setattr(pair_mod, "GRAM_SLICE_BYTES", 8 * n * rows)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_in_place_qr_gives_the_numbers_of_torch_qr(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tall route (QR in one buffer, U written back in row blocks) equals `torch.linalg.qr`
    + one product on the float64 upcast: bit for bit when U is one block (every matrix up to
    GRAM_SLICE_BYTES in float64), to 2e-16 absolute in 7-row blocks (the BLAS kernel of a
    7-row product rounds differently); for every input dtype; U orthonormal, S the float64
    SVD's to 1e-12 of S_1."""
    w = _pair(300, 40, seed=1)[0].to(dtype)
    w64 = w.double()
    q, r = torch.linalg.qr(w64)
    s_ref, u_r = exact.gram_eigh(r @ r.mT, 40)
    u_ref = q @ u_r
    u, s = exact.gram_left_svd(w)
    assert u.dtype == torch.float64 and u.shape == (300, 40)
    assert torch.equal(s, s_ref) and torch.equal(u, u_ref)
    top, s_top = exact.gram_left_svd(w, top=5)
    assert torch.equal(top, u_ref[:, :5]) and torch.equal(s_top, s_ref)
    _small_slices(monkeypatch, 40, rows=7)
    u, s = exact.gram_left_svd(w)
    assert torch.equal(s, s_ref)
    assert torch.allclose(u, u_ref, rtol=0, atol=2e-16)
    assert torch.allclose(u.mT @ u, torch.eye(40, dtype=torch.float64), rtol=0, atol=1e-12)
    svd = torch.linalg.svdvals(w64)
    assert torch.allclose(s, svd, rtol=0, atol=1e-12 * float(svd[0]))


@pytest.mark.parametrize("shape", [(900, 70), (70, 900), (300, 300)])
def test_difference_gram_equals_the_whole_difference(
    shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The singular values of W1 - W0 from slices of the difference: bit for bit those of the
    float64 difference through gram_svdvals (one product here, and the same slices when both
    are sliced); sliced vs one product to 1e-12 of S_1^2 on every S_i^2, as the float64 SVD."""
    w0, w1 = _pair(*shape, seed=2)
    d64 = w1.double() - w0.double()
    whole = exact.gram_svdvals(d64[None])[0]
    assert torch.equal(exact.gram_svdvals_diff(w1, w0), whole)
    _small_slices(monkeypatch, min(shape), rows=64)
    assert exact.gram_block((1, *shape)) == 64  # 15, 15 and 5 slices
    sliced = exact.gram_svdvals_diff(w1, w0)
    assert torch.equal(sliced, exact.gram_svdvals(d64[None])[0])
    s1 = float(whole[0])
    assert torch.allclose(sliced**2, whole**2, rtol=0, atol=1e-12 * s1**2)
    ref = torch.linalg.svdvals(d64)
    assert torch.allclose(sliced**2, ref**2, rtol=0, atol=1e-12 * s1**2)


def _assert_same(a: dict, b: dict, *, rel: float) -> None:
    """Equal pair results: strings, ints and shapes exactly, floats to `rel` (0: exactly)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key], rel=rel)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y, rel=rel)
    elif isinstance(a, float) and rel > 0:
        assert b == pytest.approx(a, rel=rel, abs=1e-300)
    else:
        assert a == b


@pytest.mark.parametrize("shape", [(400, 48), (48, 400)])
def test_compare_pair_in_stored_dtype_equals_float64(
    shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """compare_pair on bf16 inputs (upcast inside, slice by slice) gives exactly what it gives on
    their float64 upcast (the old job read float64); with every sliced route forced (10-row
    slices), the same numbers to 1e-12 (only the summation order of the update's Gram matrix
    and of ||W_base||_F, and the rounding of U's row-block products, change). The LoRA route
    (W_ft formed by row slices) likewise."""
    w0, w1 = (w.bfloat16() for w in _pair(*shape, seed=3))
    ref = compare_pair(w0.double(), w1.double(), k=5, epsilons=(0.5, 0.9)).to_dict()
    _assert_same(compare_pair(w0, w1, k=5, epsilons=(0.5, 0.9)).to_dict(), ref, rel=0)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(4, shape[1], generator=g), torch.randn(shape[0], 4, generator=g)
    lora_ref = compare_pair(w0.double(), lora=(a, b, 0.5), k=5).to_dict()
    _assert_same(compare_pair(w0, lora=(a, b, 0.5), k=5).to_dict(), lora_ref, rel=0)
    _small_slices(monkeypatch, min(shape), rows=10)
    _assert_same(compare_pair(w0, w1, k=5, epsilons=(0.5, 0.9)).to_dict(), ref, rel=1e-12)
    _assert_same(compare_pair(w0, lora=(a, b, 0.5), k=5).to_dict(), lora_ref, rel=1e-12)


def test_a_cached_base_u_is_taken_after_the_fine_tunes_vectors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """base_svd may be a function: called once, after the fine-tune's top vectors (so a cached
    U never coexists with the fine-tune's QR buffer), and its (U, S) is used as given."""
    w0, w1 = _pair(300, 40, seed=5)
    order: list[str] = []
    real = pair_mod.left_singular

    def spy(w: torch.Tensor, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
        order.append("fine-tune" if w is w1 else "base")
        return real(w, **kw)  # type: ignore[arg-type]

    def cached() -> tuple[torch.Tensor, torch.Tensor]:
        order.append("cache")
        u, s = real(w0)
        return u.contiguous(), s  # row-major, as read back from the cache

    monkeypatch.setattr(pair_mod, "left_singular", spy)
    lazy = compare_pair(w0, w1, base_svd=cached).to_dict()
    plain = compare_pair(w0, w1).to_dict()
    assert order == ["fine-tune", "cache", "fine-tune", "base"]
    assert lazy == plain  # layout of U (row- or column-major) does not move a bit


def test_compare_json_is_the_same_bytes_without_a_cache_on_a_miss_and_on_a_hit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`spectra compare` writes byte-identical compare.json with no cache, with --cache-dir on a
    miss (the base's column-major U streamed into the entry in row blocks) and on a hit (U read
    block by block into a row-major tensor). Sliced routes and payload blocks forced small, so
    U is written back, stored and read in many blocks; a tall, a wide and a square bf16 pair."""
    tensors: dict[str, dict[str, torch.Tensor]] = {"base": {}, "ft": {}}
    for i, shape in enumerate([(300, 40), (40, 300), (60, 60)]):
        w0, w1 = _pair(*shape, seed=10 + i)
        tensors["base"][f"layers.{i}.mlp.up_proj.weight"] = w0.bfloat16()
        tensors["ft"][f"layers.{i}.mlp.up_proj.weight"] = w1.bfloat16()
    files = {}
    for side, found in tensors.items():
        files[side] = tmp_path / f"{side}.safetensors"
        save_file(found, str(files[side]))
    _small_slices(monkeypatch, 40, rows=7)
    monkeypatch.setattr(cache_mod, "PAYLOAD_BLOCK_BYTES", 8 * 40 * 3 + 5)  # 3 rows of U
    runner = CliRunner()

    def run(name: str, *extra: str) -> bytes:
        out = tmp_path / name
        args = ["compare", str(files["base"]), str(files["ft"]), "--out", str(out), *extra]
        res = runner.invoke(app, [*args, "--device", "cpu", "--k", "5"])
        assert res.exit_code == 0, res.output
        return (out / "compare.json").read_bytes()

    plain = run("plain")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert run("miss", *cache) == plain
    entries = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(entries) == 3
    assert run("hit", *cache) == plain
    assert sorted((tmp_path / "cache").rglob("*.safetensors")) == sorted(entries)  # read, kept
