"""`spectra mitigate`: the pure mitigation against its definition, and the job on synthetic
checkpoints (sharded, half precision) and on bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _compare_fixtures import Q0, D, base_and_ft, lora_and_merged, save
from _mitigate_fixtures import reference
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from spectra.adapt.mitigate import (
    Detection,
    check_lambda,
    detect_intruders,
    extend_factors,
    moved_directions,
    new_alpha,
    refit_factors,
    scale_directions,
)
from spectra.analysis.comparison import CompareOptions
from spectra.cli.main import app
from spectra.errors import OutputError, ValidationError
from spectra.formats.peft import lora_scale
from spectra.formats.safetensors import INDEX_NAME, read_header
from spectra.jobs.compare import compare
from spectra.jobs.mitigate import REPORT_NAME, MitigateOptions, check_base_name, mitigate

runner = CliRunner()


def _matrix(m: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------ pure functions


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_scaled_directions_equal_the_svd_definition(shape: tuple[int, int]) -> None:
    w0, w1 = _matrix(*shape, seed=0), _matrix(*shape, seed=1)
    det = detect_intruders(w0, w1, k=10, epsilon=0.5)
    # two unrelated random matrices: some top vectors of one are far from all of the other's
    want, idx = reference(w0, w1, 10, 0.5, 0.6)
    assert idx and list(det.indices) == idx
    got = scale_directions(w1, det.u_top[:, list(det.indices)], 0.6)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_forced_directions_scale_exactly_their_singular_values() -> None:
    w = _matrix(40, 25, seed=3)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    got = scale_directions(w, u[:, [0, 3]], 0.25)
    s2 = s.clone()
    s2[[0, 3]] *= 0.25
    torch.testing.assert_close(got, (u * s2) @ vh, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.linalg.svdvals(got), s2.sort(descending=True).values)


@pytest.mark.parametrize(("scale", "rslora"), [(2.0, False), (-0.5, False), (4.0, True)])
def test_extended_factors_carry_the_mitigation_at_the_same_scale(
    scale: float, rslora: bool
) -> None:
    w0 = _matrix(24, 32, seed=4)
    a, b = _matrix(3, 32, seed=5), _matrix(24, 3, seed=6)
    w1 = w0 + scale * b @ a
    u, s, vh = torch.linalg.svd(w1, full_matrices=False)
    a2, b2 = extend_factors(a, b, scale, (u[:, [0, 2]], w1, 0.4))
    assert a2.shape == (5, 32) and b2.shape == (24, 5)
    torch.testing.assert_close(a2[:3], a, rtol=0, atol=0)
    torch.testing.assert_close(b2[:, :3], b, rtol=0, atol=0)
    alpha = new_alpha(scale, 5, rslora=rslora)
    got = w0 + lora_scale(alpha, 5, rslora=rslora) * b2 @ a2
    s2 = s.clone()
    s2[[0, 2]] *= 0.4
    torch.testing.assert_close(got, (u * s2) @ vh, rtol=0, atol=1e-10)
    # norms shared between the new rows of A and columns of B
    torch.testing.assert_close(a2[3:].norm(dim=1), b2[:, 3:].norm(dim=0))


def test_refit_is_the_best_rank_r_fit_of_the_mitigated_update() -> None:
    w0, w_new = _matrix(20, 16, seed=7), _matrix(20, 16, seed=8)
    b, a = refit_factors(w0, w_new, 3, 2.0)
    u, s, vh = torch.linalg.svd((w_new - w0) / 2.0, full_matrices=False)
    torch.testing.assert_close(b @ a, (u[:, :3] * s[:3]) @ vh[:3], rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.0001, float("nan"), float("inf"), True, "0.5"])
def test_lambda_outside_0_1_is_refused(bad: object) -> None:
    with pytest.raises(ValidationError, match=r"lambda must be a number in \(0, 1\]"):
        check_lambda(bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="lambda"):
        MitigateOptions(lam=bad)  # type: ignore[arg-type]


def test_options_refuse_bad_k_epsilon_and_policy() -> None:
    with pytest.raises(ValidationError, match="k must be a positive integer"):
        MitigateOptions(k=0)
    with pytest.raises(ValidationError, match="epsilon must be in"):
        MitigateOptions(epsilon=1.5)
    with pytest.raises(ValidationError, match="rank_policy must be one of extend, peft"):
        MitigateOptions(rank_policy="truncate")
    assert MitigateOptions(lam=1).lam == 1.0  # 1 is allowed (leaves the matrix as it is)


def test_moved_directions_say_where_each_direction_lands() -> None:
    s = torch.tensor([10.0, 8.0, 6.0, 4.0, 2.0], dtype=torch.float64)
    det = Detection(torch.eye(5, dtype=torch.float64), s, (0.1, 0.9, 0.2, 0.9, 0.9), (0, 2))
    moved = moved_directions(det, 0.5)
    assert [(d.index, d.new_singular_value, d.new_position) for d in moved] == [
        (0, 5.0, 1),  # 8, 5, 4, 3, 2
        (2, 3.0, 3),
    ]


# ------------------------------------------------------------------ checkpoints


def _sharded(root: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> Path:
    """Two shards plus an index and a config, like save_pretrained writes them."""
    root.mkdir(parents=True)
    names = sorted(tensors)
    halves = {
        "model-00001-of-00002.safetensors": names[:3],
        "model-00002-of-00002.safetensors": names[3:],
    }
    weight_map = {}
    for shard, keys in halves.items():
        save_file(
            {k: tensors[k].to(dtype).contiguous() for k in keys}, root / shard, {"format": "pt"}
        )
        weight_map.update({k: shard for k in keys})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (root / INDEX_NAME).write_text(json.dumps(index))
    (root / "config.json").write_text('{"model_type": "llama", "torch_dtype": "bfloat16"}')
    (root / "notes.txt").write_text("not a side file")
    return root


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_checkpoint_changes_only_the_intruder_matrix(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    base, ft, _ = base_and_ft()
    b_dir = _sharded(tmp_path / "base", base, dtype)
    f_dir = _sharded(tmp_path / "ft", ft, dtype)
    res = mitigate(b_dir, f_dir, tmp_path / "out", MitigateOptions(lam=0.5, device="cpu"))
    out = res.out
    assert out == (tmp_path / "out").absolute()
    assert [m.key for m in res.changed] == [Q0]  # the planted rank-1 intruder (compare's test)
    (only,) = res.changed[0].directions
    assert only.index == 0 and only.max_cos < 0.5
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [*(p.name for p in f_dir.iterdir() if p.name != "notes.txt"), REPORT_NAME]
    )
    assert (out / INDEX_NAME).read_bytes() == (f_dir / INDEX_NAME).read_bytes()
    for shard in sorted(f_dir.glob("*.safetensors")):
        src, dst = read_header(shard), read_header(out / shard.name)
        assert [(t.name, t.dtype, t.shape) for t in src.in_data_order()] == [
            (t.name, t.dtype, t.shape) for t in dst.in_data_order()
        ]
        with safe_open(shard, "pt") as fs, safe_open(out / shard.name, "pt") as fd:
            for name in fs.keys():  # noqa: SIM118 - safe_open has keys(), no iteration
                same = torch.equal(fs.get_tensor(name), fd.get_tensor(name))
                assert same == (name != Q0), name
                if name == Q0:
                    w1 = fs.get_tensor(name).double()
                    w0 = base[Q0].to(dtype).double()
                    want, idx = reference(w0, w1, 10, 0.5, 0.5)
                    assert idx == [0]
                    got = fd.get_tensor(name)
                    assert got.dtype == dtype
                    torch.testing.assert_close(got, want.to(dtype), rtol=0, atol=0)
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["matrices_changed"] == 1 and report["directions"] == 1
    assert report["options"]["lambda"] == 0.5
    # compare of the result: the planted direction (3.0 -> 1.5 < S_10 of the base? no: the base's
    # S_1 is 2, so 1.5 stays in the top-10) is still there, as the report says
    cmp = compare(b_dir, out, CompareOptions(epsilons=(0.5,), device="cpu"))
    assert cmp.pair(Q0).intruders.count(0.5) == res.changed[0].intruders_after == 1


def test_small_lambda_pushes_the_direction_out_of_the_top_k(tmp_path: Path) -> None:
    base, ft, _ = base_and_ft()
    b_dir, f_dir = save(tmp_path / "base", base), save(tmp_path / "ft", ft)
    res = mitigate(b_dir, f_dir, tmp_path / "out", MitigateOptions(lam=0.05, device="cpu"))
    (row,) = res.changed
    assert row.directions[0].new_position >= 10  # 3.0 * 0.05 = 0.15, below the base's S_10
    assert row.intruders_after == 0
    cmp = compare(b_dir, res.out, CompareOptions(epsilons=(0.5,), device="cpu"))
    assert cmp.forensics.intruders_total == {"0.5": 0}
    before = compare(b_dir, f_dir, CompareOptions(epsilons=(0.5,), device="cpu"))
    assert before.forensics.intruders_total == {"0.5": 1}


def test_cache_from_compare_gives_the_same_bits(tmp_path: Path) -> None:
    base, ft, _ = base_and_ft()
    b_dir, f_dir = save(tmp_path / "base", base), save(tmp_path / "ft", ft)
    cache = tmp_path / "cache"
    compare(b_dir, f_dir, CompareOptions(device="cpu"), cache=cache)

    def entries() -> list[str]:  # the spectrum entries (not the shard-digest memo)
        return sorted(p.name for p in cache.rglob("*") if p.is_file() and p.name != "shards.json")

    before = entries()
    assert before
    opts = MitigateOptions(lam=0.5, device="cpu")
    fresh = mitigate(b_dir, f_dir, tmp_path / "fresh", opts)
    cached = mitigate(b_dir, f_dir, tmp_path / "cached", opts, cache=cache)
    assert entries() == before  # every base (U, S) was a hit
    assert (fresh.out / "model.safetensors").read_bytes() == (
        cached.out / "model.safetensors"
    ).read_bytes()
    assert [m.to_dict() for m in fresh.matrices] == [m.to_dict() for m in cached.matrices]
    with pytest.raises(OutputError):  # the cache folder is never an output
        mitigate(b_dir, f_dir, cache, opts, cache=cache, force=True)


def test_matrices_it_cannot_rewrite_are_refused_before_writing(tmp_path: Path) -> None:
    base, ft, _ = base_and_ft()
    b_dir = save(tmp_path / "base", base)
    f_dir = tmp_path / "ft"
    f_dir.mkdir()
    stored = {k: v.float() for k, v in ft.items()}
    stored[Q0] = stored[Q0].to(torch.float8_e4m3fn)
    save_file(stored, f_dir / "model.safetensors")
    with pytest.raises(ValidationError, match=r"--exclude"):
        mitigate(b_dir, f_dir, tmp_path / "out", MitigateOptions(device="cpu"))
    assert not (tmp_path / "out").exists()


def test_no_intruders_writes_nothing(tmp_path: Path) -> None:
    base, _, _ = base_and_ft()
    b_dir, f_dir = save(tmp_path / "base", base), save(tmp_path / "ft", base)
    res = mitigate(b_dir, f_dir, tmp_path / "out", MitigateOptions(device="cpu"))
    assert res.out is None and not res.changed and len(res.matrices) == 5
    assert not (tmp_path / "out").exists()
    assert {p.name for p in tmp_path.iterdir()} == {"base", "ft"}  # no temp folder left
    cli = runner.invoke(app, ["mitigate", str(b_dir), str(f_dir), "--out", str(tmp_path / "o")])
    assert cli.exit_code == 0, cli.output
    assert "no intruder dimensions" in cli.output and "nothing written" in cli.output
    assert not (tmp_path / "o").exists()


def test_existing_output_is_refused_without_force(tmp_path: Path) -> None:
    base, ft, _ = base_and_ft()
    b_dir, f_dir = save(tmp_path / "base", base), save(tmp_path / "ft", ft)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="--force"):
        mitigate(b_dir, f_dir, tmp_path / "out", MitigateOptions(device="cpu"))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(OutputError):  # never the input itself, even with force
        mitigate(b_dir, f_dir, f_dir, MitigateOptions(device="cpu"), force=True)


# ------------------------------------------------------------------ adapters (synthetic)


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_extend_reproduces_w_prime_and_keeps_the_other_modules(
    tmp_path: Path, rslora: bool
) -> None:
    b_dir, ad, merged = lora_and_merged(tmp_path)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": rslora}))
    res = mitigate(b_dir, ad, tmp_path / "out", MitigateOptions(lam=0.5, device="cpu"))
    assert res.mode == "lora"
    from spectra.formats.peft import read_peft_adapter

    src, out = read_peft_adapter(ad), read_peft_adapter(res.out)
    with (
        safe_open(merged / "model.safetensors", "pt") as fm,
        safe_open(b_dir / "model.safetensors", "pt") as fb,
    ):
        for row in res.matrices:
            module = row.ft_key
            a, b = out.factors[module]
            w0 = fb.get_tensor(row.key).double()
            a0, b0 = src.factors[module]
            w1 = w0 + src.scale(module) * b0.double() @ a0.double()
            want, idx = reference(w0, w1, 10, 0.5, 0.5)
            assert [d.index for d in row.directions] == idx
            assert a.shape[0] == 4 + len(idx) == out.rank(module)
            assert math.isclose(out.scale(module), src.scale(module), rel_tol=1e-15)
            got = w0 + out.scale(module) * b.double() @ a.double()
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            assert fm.get_tensor(row.key).shape == got.shape
    assert len(res.changed) >= 1
    assert out.settings.use_rslora == rslora


def test_single_file_checkpoint_writes_the_file_only(tmp_path: Path) -> None:
    base, ft, _ = base_and_ft()
    b_dir, f_dir = save(tmp_path / "base", base), save(tmp_path / "ft", ft)
    (f_dir / "config.json").write_text("{}")  # beside a single file: not a checkpoint folder
    res = mitigate(
        b_dir / "model.safetensors",
        f_dir / "model.safetensors",
        tmp_path / "out",
        MitigateOptions(),
    )
    assert {p.name for p in res.out.iterdir() if not p.name.startswith(".")} == {
        "model.safetensors",
        REPORT_NAME,
    }
    assert [m.key for m in res.changed] == [Q0]


def test_hub_ids_must_name_the_same_repo() -> None:
    check_base_name("Org/Model@main", {"base_model_name_or_path": "org/model"})
    check_base_name("org/model", {"base_model_name_or_path": None})
    with pytest.raises(ValidationError, match="trained on 'org/other'|trained on org/other"):
        check_base_name("org/model", {"base_model_name_or_path": "org/other"})


def test_adapter_for_another_base_is_refused(tmp_path: Path, minilm_path: Path) -> None:
    _, ad, _ = lora_and_merged(tmp_path)
    with pytest.raises(ValidationError, match="does not have"):
        mitigate(minilm_path, ad, tmp_path / "out", MitigateOptions(device="cpu"))
    # same names, other shapes
    base, _, _ = base_and_ft()
    small = {k: v[:, : D // 2] for k, v in base.items()}
    with pytest.raises(ValidationError, match="for another base model"):
        mitigate(save(tmp_path / "small", small), ad, tmp_path / "out", MitigateOptions())
    assert not (tmp_path / "out").exists()


def test_base_model_name_mismatch_is_refused_unless_skipped(tmp_path: Path) -> None:
    b_dir, ad, _ = lora_and_merged(tmp_path)
    other = save(tmp_path / "copy", base_and_ft()[0])
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(
        json.dumps({**cfg, "base_model_name_or_path": str(other)})
    )
    with pytest.raises(ValidationError, match="was trained on .*copy.*--skip-base-check"):
        mitigate(b_dir, ad, tmp_path / "out", MitigateOptions(device="cpu"))
    res = mitigate(
        b_dir, ad, tmp_path / "out", MitigateOptions(device="cpu", check_base_name=False)
    )
    assert res.out is not None
    assert json.loads((res.out / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(other)
    cfg2 = {**cfg, "base_model_name_or_path": "org/other-model"}
    (ad / "adapter_config.json").write_text(json.dumps(cfg2))
    assert mitigate(b_dir, ad, tmp_path / "o2", MitigateOptions(device="cpu")).out is not None


def test_residual_base_adapter_is_refused(tmp_path: Path) -> None:
    b_dir, ad, _ = lora_and_merged(tmp_path)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "pissa"}))
    with pytest.raises(ValidationError, match="cannot mitigate: .*pissa"):
        mitigate(b_dir, ad, tmp_path / "out", MitigateOptions(device="cpu"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lambda", "0"], "lambda must be a number in (0, 1]"),
        (["--lambda", "1.5"], "lambda must be a number in (0, 1]"),
        (["--k", "0"], "k must be a positive integer"),
        (["--rank-policy", "x"], "rank_policy must be one of"),
    ],
)
def test_cli_bad_options_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    b_dir, ad, _ = lora_and_merged(tmp_path)
    cli = runner.invoke(app, ["mitigate", str(b_dir), str(ad), "--out", str(tmp_path / "o"), *args])
    assert cli.exit_code == 2, cli.output
    assert message in cli.output and len(cli.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_writes_the_adapter_and_prints_the_table(tmp_path: Path) -> None:
    b_dir, ad, _ = lora_and_merged(tmp_path)
    cli = runner.invoke(
        app, ["mitigate", str(b_dir), str(ad), "--out", str(tmp_path / "o"), "--lambda", "0.5"]
    )
    assert cli.exit_code == 0, cli.output
    report = json.loads((tmp_path / "o" / REPORT_NAME).read_text())
    changed = [m for m in report["matrices"] if m["directions"]]
    assert changed and report["mode"] == "lora"
    for m in changed:
        assert m["key"][:15] in cli.output  # the full name, folded over lines
        assert f"4->{4 + len(m['directions'])}" in cli.output
        for d in m["directions"]:
            assert f"{d['singular_value']:.4g}" in cli.output
    assert "wrote the mitigated adapter" in cli.output
    assert (tmp_path / "o" / "adapter_config.json").is_file()
    cli = runner.invoke(
        app,
        ["mitigate", str(b_dir), str(ad), "--out", str(tmp_path / "p"), "--rank-policy", "peft"],
    )
    assert cli.exit_code == 0, cli.output
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {4}  # PEFT's policy keeps the rank


def test_cli_writes_a_checkpoint(tmp_path: Path) -> None:
    base, ft, _ = base_and_ft()
    b_dir, f_dir = save(tmp_path / "base", base), save(tmp_path / "ft", ft)
    args = ["mitigate", str(b_dir), str(f_dir), "--out", str(tmp_path / "o"), "--lambda", "0.3"]
    cli = runner.invoke(app, args)
    assert cli.exit_code == 0, cli.output
    assert "wrote the mitigated checkpoint" in cli.output and "0.3" in cli.output
    assert json.loads((tmp_path / "o" / REPORT_NAME).read_text())["mode"] == "checkpoint"
    again = runner.invoke(app, args)  # the folder exists now
    assert again.exit_code == 2 and "--force" in again.output
    assert len(again.output.strip().splitlines()) == 1
