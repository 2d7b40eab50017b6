"""Calibration data, streaming statistics and forward-pass hooks (issue 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _adapt_fixtures import one_thread  # noqa: F401

from spectra.adapt.calib_collect import CalibrationOptions, run_calibration
from spectra.adapt.calib_data import default_corpus, load_texts
from spectra.adapt.calib_model import load_model, resolve_modules
from spectra.adapt.stats import (
    CalibrationStats,
    CovarianceAccumulator,
    IncrementalSVD,
    load_stats,
    save_stats,
)
from spectra.errors import ValidationError

# ---------------------------------------------------------------- calibration text


def test_default_corpus_is_varied_and_nonempty():
    texts = default_corpus()
    assert len(texts) >= 200
    assert len(set(texts)) == len(texts)
    assert load_texts(None, samples=5) == texts[:5]


def test_text_file_one_sample_per_line(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("first sample\n\n  second sample  \nthird\n", encoding="utf-8")
    assert load_texts(path) == ["first sample", "second sample", "third"]
    assert load_texts(path, samples=2) == ["first sample", "second sample"]


def test_jsonl_with_named_field(tmp_path):
    path = tmp_path / "calib.jsonl"
    rows = [{"prompt": "alpha", "id": 1}, {"prompt": "beta", "id": 2}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert load_texts(path, text_field="prompt") == ["alpha", "beta"]
    with pytest.raises(
        ValidationError, match=r"calib.jsonl:1: no field 'text'.*\['id', 'prompt'\]"
    ):
        load_texts(path)


def test_bad_calibration_inputs(tmp_path):
    with pytest.raises(ValidationError, match="does not exist"):
        load_texts(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValidationError, match="bad.jsonl:2: not valid JSON"):
        load_texts(bad)
    with pytest.raises(ValidationError, match="samples must be >= 1, got 0"):
        load_texts(None, samples=0)


# ---------------------------------------------------------------- streaming statistics


def test_covariance_accumulator_matches_one_shot():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(57, 6, generator=g)
    acc = CovarianceAccumulator(6)
    for chunk in X.split(10):
        acc.update(chunk)
    X64 = X.double()
    assert acc.count == 57
    torch.testing.assert_close(acc.covariance(), X64.T @ X64 / 57, rtol=1e-12, atol=1e-12)


def test_incremental_svd_equals_centred_svd_when_nothing_is_truncated():
    g = torch.Generator().manual_seed(1)
    X = (
        torch.randn(200, 10, generator=g, dtype=torch.float64)
        @ torch.randn(10, 10, generator=g, dtype=torch.float64)
        + 3.0
    )
    svd = IncrementalSVD(4, 10, spare=6)  # keeps all 10 components: merges are exact
    for chunk in X.split(37):
        svd.update(chunk)
    centred = X - X.mean(0)
    _, S, Vh = torch.linalg.svd(centred, full_matrices=False)
    state = svd.state()
    torch.testing.assert_close(state.values, S[:4], rtol=1e-10, atol=1e-10)
    cos = (state.components * Vh[:4]).sum(1).abs()
    assert float(cos.min()) > 1 - 1e-10
    torch.testing.assert_close(state.mean, X.mean(0), rtol=1e-12, atol=1e-12)
    evr = state.explained_variance_ratio()
    torch.testing.assert_close(evr, S[:4] ** 2 / centred.square().sum(), rtol=1e-10, atol=0)


def test_incremental_svd_convergence_and_negative_control():
    g = torch.Generator().manual_seed(2)
    scales = torch.tensor([10.0, 5.0, 2.0] + [0.1] * 17, dtype=torch.float64)
    rows = lambda n: torch.randn(n, 20, generator=g, dtype=torch.float64) * scales  # noqa: E731
    clear = IncrementalSVD(3, 20, tau=0.99)
    for _ in range(4):
        clear.update(rows(200))
    assert clear.converged()
    # Negative control: isotropic noise has no stable principal direction.
    flat = IncrementalSVD(3, 20, tau=0.99)
    for _ in range(4):
        flat.update(torch.randn(30, 20, generator=g, dtype=torch.float64))
    assert not flat.converged()


def test_stats_round_trip(tmp_path):
    svd = IncrementalSVD(2, 5)
    svd.update(torch.randn(40, 5, generator=torch.Generator().manual_seed(3)))
    svd.update(torch.randn(40, 5, generator=torch.Generator().manual_seed(4)))
    stats = CalibrationStats(
        covariances={"a": torch.eye(5, dtype=torch.float64)},
        counts={"a": 80},
        svd={"a": svd.state()},
        shared={"b": "a"},
        skipped={"pool": "input shape (4, 5) is not (batch, tokens, features)"},
        info={"samples": 2},
    )
    back = load_stats(save_stats(tmp_path / "stats.safetensors", stats))
    assert back.counts == {"a": 80} and back.shared == {"b": "a"} and back.info == {"samples": 2}
    torch.testing.assert_close(back.covariance("b"), torch.eye(5, dtype=torch.float64))
    assert torch.equal(back.svd_state("b").components, svd.state().components)
    assert back.svd_state("a").batches == 2 and back.svd_state("a").count == 80
    with pytest.raises(ValidationError, match="no covariance for pool: skipped"):
        back.covariance("pool")
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(ValidationError, match="not a spectra calibration-statistics file"):
        load_stats(other)


# ---------------------------------------------------------------- forward passes on MiniLM


@pytest.fixture(scope="module")
def minilm(minilm_path):
    model, tokenizer = load_model(minilm_path, "cpu")
    return model, tokenizer


def _linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_module_names_resolve_from_weight_names(minilm):
    model, _ = minilm
    mapping = resolve_modules(model, ["encoder.layer.0.attention.self.query.weight", "nope.weight"])
    assert mapping == {
        "encoder.layer.0.attention.self.query.weight": "encoder.layer.0.attention.self.query"
    }


def test_covariance_is_batch_size_invariant_and_padding_free(minilm):
    model, tokenizer = minilm
    texts = load_texts(None, samples=6)
    targets = [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.key",
        "encoder.layer.5.output.dense",
        "pooler.dense",
    ]
    # Unpadded inputs of one layer, captured during the batch-size-1 run (no padding there).
    captured: list[torch.Tensor] = []
    layer = dict(model.named_modules())["encoder.layer.5.output.dense"]
    handle = layer.register_forward_hook(lambda m, a, o: captured.append(a[0][0].double()))
    model.train()  # calibration must run in eval mode and put this back
    try:
        one = run_calibration(
            model, tokenizer, texts, targets, CalibrationOptions(batch_size=1, covariance=True)
        )
    finally:
        handle.remove()
    assert model.training
    four = run_calibration(
        model, tokenizer, texts, targets, CalibrationOptions(batch_size=4, covariance=True)
    )
    assert model.training
    model.eval()
    real_tokens = int(tokenizer(texts, padding=True, return_tensors="pt")["attention_mask"].sum())
    assert one.counts["encoder.layer.0.attention.self.query"] == real_tokens
    assert four.counts == one.counts
    for name in targets[:-1]:
        a, b = one.covariance(name), four.covariance(name)
        assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max())
    # q and k see the same tensor: one computation, shared.
    assert one.shared == {
        "encoder.layer.0.attention.self.key": "encoder.layer.0.attention.self.query"
    }
    assert "encoder.layer.0.attention.self.key" not in one.covariances
    # The pooler gets (batch, features): skipped with a note, no crash.
    assert "not (batch, tokens, features)" in one.skipped["pooler.dense"]
    # The covariance equals X^T X / tokens of the real (unpadded) inputs.
    X = torch.cat(captured)
    assert X.shape[0] == real_tokens
    ref = X.T @ X / X.shape[0]
    got = one.covariance("encoder.layer.5.output.dense")
    assert float((ref - got).abs().max()) <= 1e-12 * float(ref.abs().max())


def test_svd_collection_caps_batches_and_shares_qkv(minilm):
    model, tokenizer = minilm
    names = _linear_names(model)[:4]  # layer 0: q, k, v, o
    opts = CalibrationOptions(
        batch_size=2, svd_components={n: 4 for n in names}, tau=0.999999, max_batches=3
    )
    stats = run_calibration(model, tokenizer, load_texts(None, samples=16), names, opts)
    assert stats.info["batches"] == 3 and stats.info["stop"] == "cap"
    assert not stats.covariances  # only what was asked for
    leaders = set(stats.svd)
    assert "encoder.layer.0.attention.self.query" in leaders
    assert "encoder.layer.0.attention.self.value" not in leaders
    assert stats.svd_state("encoder.layer.0.attention.self.value") is stats.svd_state(
        "encoder.layer.0.attention.self.query"
    )
    assert all(s.components.shape == (4, s.mean.shape[0]) for s in stats.svd.values())


def test_calibration_options_are_validated():
    with pytest.raises(ValidationError, match="batch_size must be >= 1, got 0"):
        CalibrationOptions(batch_size=0, covariance=True)
    with pytest.raises(ValidationError, match="nothing to collect"):
        CalibrationOptions()


def test_eva_statistics_and_ranks_for_a_method(minilm_path):
    from spectra.adapt.calibrate import align_saved, method_ranks, method_statistics

    weights = [f"encoder.layer.0.attention.self.{p}.weight" for p in ("query", "key", "value")]
    weights.append("encoder.layer.0.output.dense.weight")
    ranks = dict.fromkeys(weights, 2)
    opts = CalibrationOptions(samples=8, batch_size=4, covariance=True, max_batches=2)
    stats = method_statistics(
        minilm_path, "eva", ranks, load_texts(None), options=opts, device="cpu"
    )
    assert not stats.covariances and stats.svd  # EVA collects the activation SVD only
    assert "encoder.layer.0.attention.self.key" in stats.modules()
    moved = method_ranks(stats, "eva", ranks)
    assert sum(moved.values()) == 8 and set(moved) == set(weights)
    # Reusing saved statistics gives the same ranks without a forward pass.
    paths = [w.removesuffix(".weight") for w in weights]
    assert method_ranks(align_saved(stats, paths), "eva", ranks, reused=True) == moved
    with pytest.raises(ValidationError, match="does not use calibration statistics"):
        method_ranks(stats, "pissa", ranks)
    with pytest.raises(ValidationError, match="does not use calibration statistics"):
        method_statistics(minilm_path, "pissa", ranks, load_texts(None), device="cpu")


class _Tripwire:
    """Unpickling this creates the file `flag` (a stand-in for code run by a hostile pickle)."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.flag, "w"))


def test_calibration_loads_safetensors_only_and_never_unpickles(minilm_path, tmp_path, monkeypatch):
    import pickle

    from spectra.errors import SourceError

    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (folder / name).symlink_to(minilm_path / name)
    flag = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(str(flag))))
    with pytest.raises(SourceError, match=r"only pickled weights \(pytorch_model.bin\).*convert"):
        load_model(folder, "cpu")
    # Past that check (a Hub id is not a folder), use_safetensors=True still refuses the pickle.
    monkeypatch.setattr("spectra.adapt.calib_model._refuse_pickle_only", lambda source: None)
    with pytest.raises(SourceError, match="cannot load"):
        load_model(folder, "cpu")
    assert not flag.exists()
    # With safetensors next to the pickle, the safetensors are what gets loaded.
    (folder / "model.safetensors").symlink_to(minilm_path / "model.safetensors")
    model, _ = load_model(folder, "cpu")
    assert not flag.exists()
    assert isinstance(model.encoder.layer[0].attention.self.query, torch.nn.Linear)
    # A Hub-style id that resolves to nothing is a one-line SourceError, not a traceback.
    with pytest.raises(SourceError, match="cannot load"):
        load_model(tmp_path / "missing", "cpu")


@pytest.mark.parametrize(
    "stats_meta",
    [
        None,  # no "stats" entry at all
        "{not json",
        "[]",
        '{"counts": {}, "svd": {}, "shared": {}, "skipped": {}}',  # no "info"
        '{"counts": {"a": "many"}, "svd": {}, "shared": {}, "skipped": {}, "info": {}}',
        '{"counts": {}, "svd": {"a": {"total_ss": 1}}, "shared": {}, "skipped": {}, "info": {}}',
        '{"counts": {}, "svd": [], "shared": {}, "skipped": {}, "info": {}}',
        '{"counts": {}, "svd": {}, "shared": {"b": 3}, "skipped": {}, "info": {}}',
    ],
)
def test_damaged_stats_metadata_is_a_validation_error_naming_the_file(
    tmp_path: Path, stats_meta: str | None
) -> None:
    """Right format tag, broken bookkeeping: a one-line ValidationError naming the file (was a
    KeyError/TypeError, i.e. an internal error)."""
    from safetensors.torch import save_file

    from spectra.adapt.stats import STATS_FORMAT

    path = tmp_path / "damaged.safetensors"
    meta = {"format": STATS_FORMAT}
    if stats_meta is not None:
        meta["stats"] = stats_meta
    save_file({"cov::a": torch.eye(2, dtype=torch.float64)}, str(path), metadata=meta)
    with pytest.raises(ValidationError, match=r"damaged\.safetensors.*--stats-out"):
        load_stats(path)


def test_truncated_stats_file_is_a_validation_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValidationError, match=r"cut\.safetensors"):
        load_stats(path)
