"""compare(): planted answers on synthetic checkpoints, float64 references, LoRA == merged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from _adapt_fixtures import one_thread  # noqa: F401 (module-wide, one torch thread)
from _compare_fixtures import DOWN0, Q0, Q1, V0, V1, D, base_and_ft, lora_and_merged, save

from spectra.analysis.comparison import CompareOptions
from spectra.analysis.htsr import RANK_EPS
from spectra.analysis.pair import PairMeta, compare_pair
from spectra.analysis.pairing import pair_matrices, parse_map
from spectra.errors import NumericalError, ValidationError
from spectra.jobs.compare import compare


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base, ft, _ = base_and_ft()
    root = tmp_path_factory.mktemp("cmp")
    return save(root / "base", base), save(root / "ft", ft)


@pytest.fixture(scope="module")
def result(pair_dirs: tuple[Path, Path]):  # noqa: ANN201 - a Comparison
    return compare(*pair_dirs, CompareOptions(k=10, epsilons=(0.5, 0.9), device="cpu"))


def _stored(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.double() for k, v in load_file(path / "model.safetensors").items()}


def test_planted_answers(result) -> None:  # noqa: ANN001
    f = result.forensics
    assert result.pair(Q0).intruders.counts[0.5] == 1
    assert result.pair(Q0).intruders.intruder_indices(0.5) == (0,)
    assert result.pair(Q0).update.numerical_rank == 1
    assert result.pair(V0).intruders.counts == {0.5: 0, 0.9: 0}
    assert result.pair(V0).kind == "full-rank"
    assert result.pair(Q1).update.numerical_rank == 3
    assert result.pair(Q1).kind == "low-rank"
    assert result.pair(V1).kind == "unchanged" and result.pair(V1).update.fro_norm == 0.0
    assert set(f.unchanged) == {V1, DOWN0}
    assert f.num_changed == 3
    assert f.intruders_total["0.5"] == 1
    assert f.top_layers[0] == (Q0, 1)
    assert f.intruders_by_role["q"]["0.5"] == 1 and f.intruders_by_depth["0"]["0.5"] == 1
    assert f.update_kind == "mixed"  # 2 low-rank, 1 full-rank
    assert result.mode == "checkpoint" and len(result.pairs) == 5


def test_every_number_matches_a_float64_reference(result, pair_dirs) -> None:  # noqa: ANN001
    base, ft = (_stored(p) for p in pair_dirs)
    for p in result.pairs:
        w0, w1 = base[p.key], ft[p.key]
        u0, s0, _ = np.linalg.svd(w0.numpy(), full_matrices=False)
        u1, s1, _ = np.linalg.svd(w1.numpy(), full_matrices=False)
        mc = np.abs(u0.T @ u1[:, :10]).max(axis=0)
        np.testing.assert_allclose(p.intruders.max_cos, mc, rtol=0, atol=1e-9)
        assert p.intruders.counts[0.5] == int((mc < 0.5).sum())
        sd = np.linalg.svd((w1 - w0).numpy(), compute_uv=False)
        ref_rank = int((sd > sd[0] * D * 2 * RANK_EPS).sum()) if sd[0] > 0 else 0
        if p.shape == (D, D):
            assert p.update.numerical_rank == ref_rank
        assert p.update.fro_norm == pytest.approx(float(np.sqrt((sd**2).sum())), rel=1e-9, abs=0)
        rel = np.linalg.norm((w1 - w0).numpy()) / np.linalg.norm(w0.numpy())
        assert p.update.rel_change == pytest.approx(rel, rel=1e-9, abs=1e-300)
        if sd[0] > 0:
            q = sd / sd.sum()
            q = q[q > 0]
            assert p.update.effective_rank == pytest.approx(math.exp(-(q * np.log(q)).sum()))
        cos = np.sort(np.cos(scipy.linalg.subspace_angles(u0[:, :10], u1[:, :10])))[::-1]
        np.testing.assert_allclose(p.drift.cosines, cos, rtol=0, atol=1e-7)
        assert p.alpha_base is not None


def test_result_is_strict_json_and_rows_are_flat(result) -> None:  # noqa: ANN001
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert (
        data["pairs"][0]["intruders"]["counts"] == {"0.5": 0, "0.9": 0}
        or data["pairs"][0]["key"] == Q0
    )
    assert set(data["forensics"]["unchanged"]) == {V1, DOWN0}
    assert data["options"]["epsilons"] == [0.5, 0.9]
    row = result.rows()[0]
    assert {"intruders@0.5", "intruders@0.9", "numerical_rank", "alpha_ft"} <= set(row)
    assert all(not isinstance(v, (list, dict)) for v in row.values())


def test_to_json_writes_the_same_text_it_returns(result, tmp_path: Path) -> None:  # noqa: ANN001
    text = result.to_json(tmp_path / "c.json")
    assert (tmp_path / "c.json").read_text() == text
    assert json.loads(text) == json.loads(json.dumps(result.to_dict(), allow_nan=False))


def test_lora_adapter_and_its_merged_checkpoint_agree(tmp_path: Path) -> None:
    base, adapter, merged = lora_and_merged(tmp_path)
    a = compare(base, adapter, CompareOptions(epsilons=(0.5, 0.7), device="cpu"))
    m = compare(base, merged, CompareOptions(epsilons=(0.5, 0.7), device="cpu"))
    assert a.mode == "lora" and {p.key for p in a.pairs} == {Q0, V1}
    assert set(a.pairing.base_only) == {V0, Q1, DOWN0}
    for pa in a.pairs:
        pm = m.pair(pa.key)
        assert pa.intruders.counts == pm.intruders.counts
        assert pa.update.numerical_rank == pm.update.numerical_rank == 4
        np.testing.assert_allclose(pa.intruders.max_cos, pm.intruders.max_cos, atol=1e-5)
        np.testing.assert_allclose(
            pa.update.top_singular_values[:4], pm.update.top_singular_values[:4], rtol=1e-5
        )
        assert pa.update.rel_change == pytest.approx(pm.update.rel_change, rel=1e-5)
        np.testing.assert_allclose(pa.drift.cosines, pm.drift.cosines, atol=1e-5)
        assert pa.alpha_ft == pytest.approx(pm.alpha_ft, rel=1e-4)
    assert a.forensics.update_kind == "low-rank" and a.forensics.apparent_rank == 4
    assert set(m.forensics.unchanged) == {V0, Q1, DOWN0}


def test_map_renames_and_pairing_errors(tmp_path: Path) -> None:
    base, ft, _ = base_and_ft()
    b = save(tmp_path / "b", base)
    renamed = save(tmp_path / "r", {"net." + k.removeprefix("model."): v for k, v in ft.items()})
    with pytest.raises(ValidationError, match=r"5 only in base.*5 only in fine-tune.*--map"):
        compare(b, renamed, CompareOptions(device="cpu"))
    out = compare(b, renamed, CompareOptions(map=[r"^net\.=>model."], device="cpu"))
    assert out.pair(Q0).ft_key == "net.layers.0.self_attn.q_proj.weight"
    assert out.pair(Q0).intruders.counts == {0.5: 1}
    partial = save(tmp_path / "p", {k: v for k, v in ft.items() if k != DOWN0})
    with pytest.raises(ValidationError, match=r"1 only in base: " + DOWN0.replace(".", r"\.")):
        compare(b, partial, CompareOptions(device="cpu"))
    ok = compare(b, partial, CompareOptions(allow_missing=True, device="cpu"))
    assert ok.pairing.base_only == (DOWN0,) and len(ok.pairs) == 4
    wrong = save(tmp_path / "w", {**ft, V1: torch.zeros(D, D + 1, dtype=torch.float64)})
    with pytest.raises(ValidationError, match=r"shape mismatch.*\(48, 48\) vs \(48, 49\)"):
        compare(b, wrong, CompareOptions(allow_missing=True, device="cpu"))


def test_pairing_is_pure_and_refuses_collisions() -> None:
    p = pair_matrices(
        {"a.w": (2, 3), "b.w": (2, 2)}, {"x.a.w": (2, 3), "c.w": (1, 1)}, [("^x\\.", "")]
    )
    assert p.pairs == (("a.w", "x.a.w"),) and p.base_only == ("b.w",) and p.ft_only == ("c.w",)
    with pytest.raises(ValidationError, match="both map to 'a.w'"):
        pair_matrices({"a.w": (1, 1)}, {"x.a.w": (1, 1), "y.a.w": (1, 1)}, [("^[xy]\\.", "")])
    with pytest.raises(ValidationError, match="no '=>'"):
        parse_map(["abc"])
    with pytest.raises(ValidationError, match="not a valid regex"):
        parse_map(["(=>x"])
    # replacements are checked up front, not when the first key happens to match
    for bad in (r"a=>\3", r"a=>\g<zz>", r"a=>\q"):
        with pytest.raises(ValidationError, match="replacement .* is not valid"):
            parse_map([bad])
    assert parse_map([r"(?P<n>a)b=>\g<n>"]) == ((r"(?P<n>a)b", r"\g<n>"),)


def test_options_are_validated() -> None:
    with pytest.raises(ValidationError, match="k must be a positive integer, got 0"):
        CompareOptions(k=0)
    with pytest.raises(ValidationError, match="epsilon must be in"):
        CompareOptions(epsilons=(0.0,))
    assert CompareOptions(epsilons=(0.9, 0.5)).epsilons == (0.5, 0.9)


def test_compare_pair_needs_exactly_one_fine_tune() -> None:
    w = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValidationError, match="exactly one"):
        compare_pair(w)
    with pytest.raises(ValidationError, match="another base model"):
        compare_pair(w, lora=(torch.zeros(2, 5), torch.zeros(4, 2), 1.0))


def test_base_svd_is_cached_across_comparisons(
    pair_dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    import spectra.analysis.pair as pair_mod
    import spectra.jobs.compare as job_mod

    calls = []
    real = job_mod.left_singular

    def counting(w: torch.Tensor, **kw):  # noqa: ANN202, ANN003
        calls.append(tuple(w.shape))
        return real(w, **kw)

    monkeypatch.setattr(job_mod, "left_singular", counting)  # the base, through the cache
    monkeypatch.setattr(pair_mod, "left_singular", counting)  # the fine-tune (and an uncached base)
    first = compare(*pair_dirs, CompareOptions(device="cpu"), cache=tmp_path / "cache")
    n_first = len(calls)
    second = compare(*pair_dirs, CompareOptions(device="cpu"), cache=tmp_path / "cache")
    assert n_first == 2 * len(first.pairs)  # base (stored) + fine-tune
    assert len(calls) - n_first == len(second.pairs)  # fine-tune only: the base came from cache
    assert second.to_dict()["pairs"] == first.to_dict()["pairs"]
    uncached = compare(*pair_dirs, CompareOptions(device="cpu"))
    assert uncached.to_dict()["pairs"] == first.to_dict()["pairs"]


@pytest.mark.slow
def test_real_minilm_lora_adapter_equals_its_peft_merge(minilm_path: Path, tmp_path: Path) -> None:
    """A few PEFT LoRA steps on the real MiniLM: the adapter folder and PEFT's own merged
    weights give the same comparison (keys, scale and factor reading checked on real files)."""
    import importlib.util

    pytest.importorskip("peft")
    spec = importlib.util.spec_from_file_location(
        "finetune_minilm", Path(__file__).parents[1] / "examples" / "finetune_minilm.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    adapter = example.finetune_lora(
        minilm_path, tmp_path / "lora", steps=3, merged_out=tmp_path / "merged"
    )
    a = compare(minilm_path, adapter, CompareOptions(epsilons=(0.5, 0.9), device="cpu"))
    m = compare(minilm_path, tmp_path / "merged", CompareOptions(epsilons=(0.5, 0.9), device="cpu"))
    assert a.mode == "lora" and len(a.pairs) == 12  # query and value in 6 layers
    assert {p.role for p in a.pairs} == {"q", "v"}
    assert len(m.forensics.unchanged) == len(m.pairs) - 12  # only q/v moved in the merge
    for pa in a.pairs:
        pm = m.pair(pa.key)
        assert pm.kind == pa.kind == "low-rank"
        assert 1 <= pa.update.numerical_rank == pm.update.numerical_rank <= 8
        assert pa.intruders.counts == pm.intruders.counts
        np.testing.assert_allclose(pa.intruders.max_cos, pm.intruders.max_cos, atol=1e-4)
        assert pa.update.rel_change == pytest.approx(pm.update.rel_change, rel=1e-3)
    assert a.forensics.update_kind == "low-rank" and a.forensics.max_low_rank <= 8


def test_forensics_rules_on_constructed_pairs() -> None:
    from dataclasses import dataclass as dc

    from spectra.analysis.drift import update_stats
    from spectra.analysis.forensics import comparison_forensics
    from spectra.analysis.intruders import IntruderResult

    @dc
    class P:
        key: str
        role: str
        layer: int | None
        shape: tuple[int, int]
        intruders: IntruderResult
        update: object

    def pair(key: str, s: list[float], n_intr: int) -> P:
        st = update_stats(torch.tensor(s, dtype=torch.float64), shape=(100, 100), base_fro=10.0)
        cos = tuple([0.1] * n_intr + [0.99] * (10 - n_intr))
        res = IntruderResult(max_cos=cos, counts={0.5: n_intr})
        return P(key, "q", 0, (100, 100), res, st)

    full = [1.0] * 100  # flat: full rank, energy spread
    peaked = [1.0] * 10 + [1e-4] * 90  # full numerical rank, 99% of energy in 10 directions
    pairs = [pair(f"m{i}", full, 0) for i in range(9)] + [pair("p", peaked, 2)]
    f = comparison_forensics(pairs, (0.5,))
    assert f.update_kind == "full-rank"  # 10/10 full-rank >= 90%
    codes = [v.code for v in f.verdicts]
    assert codes == ["changed", "update-full-rank", "effectively-low-rank", "intruders"]
    assert f.verdicts[2].evidence["keys"] == ["p"]
    assert f.top_layers == (("p", 2),) and "in 1 matrix;" in f.verdicts[3].message
    low = [pair(f"l{i}", [1.0] * 4, 0) for i in range(5)] + [pair("z", [0.0] * 4, 0)]
    g = comparison_forensics(low, (0.5,))
    assert g.update_kind == "low-rank" and g.apparent_rank == 4 and g.unchanged == ("z",)
    assert comparison_forensics([pair("z", [0.0], 0)], (0.5,)).update_kind == "none"


def test_compare_csv_is_inert(tmp_path: Path) -> None:
    """Hostile names (escape sequences, a formula) reach compare.csv inert; numbers stay numbers."""
    import csv
    import io

    base, ft, _ = base_and_ft()
    evil = {Q0: '=HYPERLINK("http://evil").q_proj.weight', V0: "+\x1b]0;pwned\x07v\x1b[31m.weight"}
    b = save(tmp_path / "b", {evil.get(k, k): v for k, v in base.items() if k in (Q0, V0)})
    f = save(tmp_path / "f", {evil.get(k, k): v for k, v in ft.items() if k in (Q0, V0)})
    text = compare(b, f, CompareOptions(k=10, epsilons=(0.5,), device="cpu")).to_csv()
    assert "\x1b" not in text and "\x07" not in text and "pwned" not in text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert sorted(r["key"] for r in rows) == ["'+v.weight", "'" + evil[Q0]]
    for r in rows:
        assert not any(c.startswith(("=", "+", "-", "@")) for c in (r["key"], r["ft_key"]))
        float(r["rel_change"])  # a number, written unquoted and unprefixed
    q = next(r for r in rows if "HYPERLINK" in r["key"])
    assert int(q["intruders@0.5"]) == 1


def test_warns_when_the_adapter_was_trained_on_a_residual_base(
    minilm_path: Path, tmp_path: Path
) -> None:
    from spectra.analysis.compare_inputs import ResidualBaseWarning
    from spectra.jobs.init import InitOptions, init_adapter

    init_adapter(
        minilm_path, InitOptions(out=tmp_path / "o", method="olora", rank=2, targets=["q"])
    )
    with pytest.warns(ResidualBaseWarning, match="olora.*spectra convert"):
        compare(minilm_path, tmp_path / "o" / "adapter", CompareOptions(roles=("q",), k=2))
    # a plain LoRA (PEFT's default init, no residual base next to it) gets no warning
    cfg = json.loads((tmp_path / "o" / "adapter" / "adapter_config.json").read_text())
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "adapter_config.json").write_text(json.dumps(cfg))
    (plain / "adapter_model.safetensors").write_bytes(
        (tmp_path / "o" / "adapter" / "adapter_model.safetensors").read_bytes()
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ResidualBaseWarning)
        compare(minilm_path, plain, CompareOptions(roles=("q",), k=2))


@pytest.mark.parametrize("side", ["base", "fine-tuned", "lora"])
def test_non_finite_weights_are_a_one_line_error_naming_the_matrix(side: str) -> None:
    bad = torch.randn(6, 4)
    bad[1, 2], bad[3, 3] = float("nan"), float("inf")
    good = torch.randn(6, 4)
    meta = PairMeta(key="enc.0.q.weight", ft_key="enc.0.q.weight")
    if side == "lora":
        factors = (torch.randn(2, 4), torch.full((6, 2), float("nan")), 1.0)
        args: dict = {"w_base": good, "lora": factors}
        match = r"the LoRA factor of enc\.0\.q\.weight has 12 NaN and 0 Inf entries of 12"
    else:
        w0, w1 = (bad, good) if side == "base" else (good, bad)
        args = {"w_base": w0, "w_ft": w1}
        match = rf"the {side} matrix enc\.0\.q\.weight has 1 NaN and 1 Inf entries of 24"
    with pytest.raises(NumericalError, match=match + r".*--exclude 'enc\.0\.q\.weight'"):
        compare_pair(**args, meta=meta)
