"""`spectra init` and `spectra convert` through the CLI: outputs, one-line errors, exit codes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from _adapt_fixtures import one_thread  # noqa: F401
from safetensors import safe_open
from typer.testing import CliRunner

from spectra.cli.main import app

Q0 = "encoder.layer.0.attention.self.query"


def _run(*args: str):  # noqa: ANN202
    return CliRunner().invoke(app, list(args))


def test_init_writes_adapter_residual_and_manifest(minilm_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = _run(
        "init",
        str(minilm_path),
        "--method",
        "milora",
        "--rank",
        "4",
        "--targets",
        f"{Q0},re:layer\\.3\\.output\\.dense$",
        "--out",
        str(out),
        "--dtype",
        "bfloat16",
        "--alpha",
        "8",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    assert "milora: 2 modules, ranks 4-4" in r.output
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted([Q0, "encoder.layer.3.output.dense"])
    assert cfg["lora_alpha"] == 8 and cfg["init_lora_weights"] is True
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as fh:
        a = fh.get_tensor(f"base_model.model.{Q0}.lora_A.weight")
    assert a.dtype == torch.bfloat16 and a.shape == (4, 384)
    manifest = json.loads((out / "spectra.json").read_text())
    assert manifest["options"]["alpha"] == 8.0 and manifest["method"] == "milora"
    assert all(v["error"] < 1e-6 for v in manifest["matrices"].values())
    assert (out / "residual_base" / "config.json").is_file()
    assert (out / "residual_base" / "tokenizer.json").is_file()
    # A second run refuses to overwrite, --force replaces.
    again = _run("init", str(minilm_path), "--rank", "2", "--targets", Q0, "--out", str(out))
    assert again.exit_code == 2 and "--force" in again.output
    forced = _run(
        "init",
        str(minilm_path),
        "--rank",
        "2",
        "--targets",
        Q0,
        "--out",
        str(out),
        "--force",
        "--method",
        "olora",
    )
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "spectra.json").read_text())["method"] == "olora"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--targets", "gate"], "no weight matrix matched targets gate: roles here are"),
        (["--targets", Q0, "--rank", "999"], "exceeds min(m, n) = 384"),
        (["--targets", Q0, "--method", "lorax"], "unknown method 'lorax'"),
        (["--targets", Q0, "--allocate", "energy", "--budget", "5000"], "exceeds the maximum 384"),
        (["--targets", Q0, "--budget", "5"], "--budget needs --allocate"),
        (["--targets", "re:(", "--rank", "2"], "bad target regex"),
        (["--targets", Q0, "--dtype", "int8"], "adapter dtype 'int8'"),
    ],
)
def test_one_line_errors(minilm_path: Path, tmp_path: Path, args: list[str], message: str) -> None:
    r = _run("init", str(minilm_path), "--out", str(tmp_path / "x"), *args)
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert message in text
    assert "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


def test_convert_cli(minilm_path: Path, tmp_path: Path) -> None:
    init = tmp_path / "init"
    assert (
        _run("init", str(minilm_path), "--rank", "2", "--targets", Q0, "--out", str(init)).exit_code
        == 0
    )
    r = _run(
        "convert",
        "--init",
        str(init),
        "--trained",
        str(init / "adapter"),
        "--out",
        str(tmp_path / "lora"),
    )
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {Q0: 4} and cfg["alpha_pattern"] == {Q0: 4}
    bad = _run(
        "convert",
        "--init",
        str(tmp_path / "nope"),
        "--trained",
        str(init),
        "--out",
        str(tmp_path / "l2"),
    )
    assert bad.exit_code == 2 and "does not exist" in bad.output
    # An adapter folder with no spectra.json near it: the original base must be given.
    lonely = shutil.copytree(init / "adapter", tmp_path / "elsewhere" / "adapter")
    args = ("convert", "--init", str(lonely), "--trained", str(lonely), "--out")
    unknown = _run(*args, str(tmp_path / "l3"))
    assert unknown.exit_code == 2 and "--base" in unknown.output, unknown.output
    assert len(unknown.output.strip().splitlines()) == 1
    given = _run(*args, str(tmp_path / "l4"), "--base", str(minilm_path))
    assert given.exit_code == 0, given.output
    cfg = json.loads((tmp_path / "l4" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(minilm_path)


# ------------------------------------------------------------ data-driven methods (issue 7)

LAYER0 = (
    r"re:^encoder\.layer\.0\.(attention\.self\.(query|value)|attention\.output\.dense|"
    r"intermediate\.dense|output\.dense)$"
)
CALIB_ARGS = ("--samples", "8", "--max-length", "32", "--batch-size", "4", "--device", "cpu")


@pytest.fixture(scope="module")
def minilm_reference(minilm_path: Path):  # noqa: ANN201
    """(tokenized batch, last_hidden_state of the original MiniLM) on three short texts."""
    from transformers import AutoModel, AutoTokenizer

    texts = ["a short test sentence", "the weights stay where they are", "spectra"]
    enc = AutoTokenizer.from_pretrained(minilm_path)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = AutoModel.from_pretrained(minilm_path).eval()(**enc).last_hidden_state
    return enc, ref


def _token_gap(got: torch.Tensor, ref: torch.Tensor, enc) -> float:  # noqa: ANN001
    """Largest |got - ref| over the real (unpadded) tokens.

    Padded positions are left out because float32 rounding, not the adapter, decides them: on
    these texts the original model's own float32 output at a padded position is 9.1e-5 from its
    float64 output (real tokens: 3.1e-6; the gap grows ~10x per layer at padded positions only),
    and rounding the five layer-0 weights by one ulp at random moves padded outputs by 4.6e-5 to
    7.2e-5. A residual base + CorDA-IPM adapter evaluated in float64 is 6.1e-7 from the original
    in float64 on every position, so what it writes is exact to its storage; compared on real
    tokens its float32 output is 3.1e-6 from the original's.
    """
    mask = enc["attention_mask"].bool()  # (batch, tokens)
    return float((got - ref).abs()[mask].max())


def _peft_output(base: Path, adapter: Path, enc) -> torch.Tensor:  # noqa: ANN001
    from peft import PeftModel
    from transformers import AutoModel

    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return model(**enc).last_hidden_state


def _init_json(out: Path) -> tuple[dict, dict]:
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    return cfg, json.loads((out / "spectra.json").read_text())


def test_cli_corda_ipm_then_kpm_from_saved_stats(
    minilm_path: Path, tmp_path: Path, minilm_reference
) -> None:
    enc, ref = minilm_reference
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(f"sample number {i} about weights and data" for i in range(8)))
    stats = tmp_path / "stats.safetensors"
    targets = LAYER0 + r"|^pooler\.dense$"
    common = ("--rank", "4", "--alpha", "8", "--targets", targets, *CALIB_ARGS)
    ipm = _run(
        "init", str(minilm_path), "--method", "corda-ipm", "--calib", str(calib),
        "--stats-out", str(stats), "--out", str(tmp_path / "ipm"), *common,
    )  # fmt: skip
    assert ipm.exit_code == 0, ipm.output
    said = " ".join(ipm.output.split())
    assert "calibration: 8 samples" in said and "1 target(s) skipped" in said
    cfg, manifest = _init_json(tmp_path / "ipm")
    record = manifest["calibration"]
    assert record["data"] == str(calib) and record["samples"] == 8 and record["tokens"] > 8
    assert "not (batch, tokens, features)" in record["skipped"]["pooler.dense"]
    assert record["ranks_after"]["pooler.dense.weight"] == 0  # skipped: no adapter there
    assert "pooler.dense" not in cfg["target_modules"] and len(cfg["target_modules"]) == 5
    got = _peft_output(tmp_path / "ipm" / "residual_base", tmp_path / "ipm" / "adapter", enc)
    assert _token_gap(got, ref, enc) <= 1e-4
    # KPM from the saved statistics: no forward pass, other components, same guarantee.
    kpm = _run(
        "init", str(minilm_path), "--method", "corda-kpm", "--stats", str(stats),
        "--out", str(tmp_path / "kpm"), *common,
    )  # fmt: skip
    assert kpm.exit_code == 0, kpm.output
    _, manifest_k = _init_json(tmp_path / "kpm")
    assert manifest_k["calibration"]["stats_file"] == str(stats)
    assert manifest_k["calibration"]["data"] == str(calib)  # carried by the statistics file
    got = _peft_output(tmp_path / "kpm" / "residual_base", tmp_path / "kpm" / "adapter", enc)
    assert _token_gap(got, ref, enc) <= 1e-4
    # Statistics saved for CorDA hold no activation SVD: EVA says so instead of planning nothing.
    wrong = _run(
        "init", str(minilm_path), "--method", "eva", "--stats", str(stats),
        "--out", str(tmp_path / "eva"), *common,
    )  # fmt: skip
    assert wrong.exit_code == 2 and "hold no activation SVD (eva)" in wrong.output, wrong.output
    key = f"base_model.model.{Q0}.lora_B.weight"
    with (
        safe_open(str(tmp_path / "ipm" / "adapter" / "adapter_model.safetensors"), "pt") as a,
        safe_open(str(tmp_path / "kpm" / "adapter" / "adapter_model.safetensors"), "pt") as b,
    ):
        # IPM keeps the largest components of W C, KPM the smallest: B's norms differ a lot.
        assert a.get_tensor(key).norm() > 3 * b.get_tensor(key).norm()


def test_cli_eva_redistributes_ranks_and_alphas(
    minilm_path: Path, tmp_path: Path, minilm_reference
) -> None:
    enc, ref = minilm_reference
    out = tmp_path / "eva"
    r = _run(
        "init", str(minilm_path), "--method", "eva", "--rank", "4", "--alpha", "8",
        "--targets", LAYER0, "--max-batches", "2", "--rho", "2", "--out", str(out), *CALIB_ARGS,
        "--rslora",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "residual base" not in r.output  # EVA leaves the base unchanged
    cfg, manifest = _init_json(out)
    record = manifest["calibration"]
    after = {k.removesuffix(".weight"): v for k, v in record["ranks_after"].items()}
    assert sum(after.values()) == 5 * 4 and len(set(after.values())) > 1  # moved, on budget
    kept = {m: r for m, r in after.items() if r > 0}
    ranks = {m: cfg["rank_pattern"].get(m, cfg["r"]) for m in cfg["target_modules"]}
    alphas = {m: cfg["alpha_pattern"].get(m, cfg["lora_alpha"]) for m in cfg["target_modules"]}
    assert ranks == kept
    # adjust_scaling under rsLoRA keeps alpha / sqrt(r): alpha_l = 8 sqrt(r_l / 4)
    assert alphas == pytest.approx({m: 8 * math.sqrt(r / 4) for m, r in kept.items()})
    assert cfg["use_rslora"] is True
    assert set(record["convergence"]) == set(kept) and record["batches"] == 2
    assert record["stop"] in ("cap", "converged") and record["rho"] == 2.0
    got = _peft_output(minilm_path, out / "adapter", enc)
    assert float((got - ref).abs().max()) <= 1e-6  # B = 0: the output is unchanged at init
    # --no-adjust-scaling keeps one alpha for every module.
    r2 = _run(
        "init", str(minilm_path), "--method", "eva", "--rank", "4", "--alpha", "8",
        "--targets", LAYER0, "--max-batches", "2", "--no-adjust-scaling",
        "--out", str(tmp_path / "eva2"), *CALIB_ARGS,
    )  # fmt: skip
    assert r2.exit_code == 0, r2.output
    cfg2, _ = _init_json(tmp_path / "eva2")
    assert cfg2["lora_alpha"] == 8 and set(cfg2["alpha_pattern"].values()) <= {8}


def test_cli_lamda_allocates_by_tail_energy(
    minilm_path: Path, tmp_path: Path, minilm_reference
) -> None:
    enc, ref = minilm_reference
    out = tmp_path / "lamda"
    r = _run(
        "init", str(minilm_path), "--method", "lamda++", "--rank", "4", "--targets", LAYER0,
        "--calib", str(tmp_path / "ignored.txt"), "--out", str(out), "--device", "cpu",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "reads only the weights" in " ".join(r.output.split())
    cfg, manifest = _init_json(out)
    allocation = manifest["allocation"]
    assert allocation["allocator"] == "lamda++" and "energy reading" in allocation["formula"]
    assert sum(allocation["ranks"].values()) == 5 * 4
    assert manifest["calibration"] is None
    got = _peft_output(out / "residual_base", out / "adapter", enc)
    assert _token_gap(got, ref, enc) <= 1e-4


def test_init_help_teaches_the_methods() -> None:
    r = _run("init", "--help")
    text = " ".join(r.output.replace("│", " ").split())
    assert "LaMDA++ (energy reading of arXiv 2406.12832, not the paper's formula): ranks " in text
    assert "proportional to weight-spectrum energy beyond a base rank" in text
    for flag in ("--calib", "--stats-out", "--rho", "--tau", "--no-adjust-scaling"):
        assert flag in text


def test_calibration_errors_are_one_line(
    minilm_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ("init", str(minilm_path), "--method", "eva", "--targets", Q0, "--device", "cpu")
    cases = [
        (("--calib", str(tmp_path / "none.txt")), "does not exist"),
        (("--stats", str(tmp_path / "none.safetensors")), "does not exist"),
        (("--rho", "0.5"), "rho must be >= 1"),
        (("--batch-size", "0"), "batch_size must be >= 1, got 0"),
    ]
    for extra, message in cases:
        r = _run(*base, "--out", str(tmp_path / "x"), *extra)
        assert r.exit_code == 2 and message in r.output, r.output
        assert r.output.count("\n") == 1 and not (tmp_path / "x").exists()
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    r = _run(*base, "--out", str(tmp_path / "x"), "--samples", "2")
    assert r.exit_code == 2 and "pip install 'spectra[calib]'" in r.output, r.output
    assert r.output.count("\n") == 1 and "Traceback" not in r.output


def test_torchrun_ranks_other_than_zero_do_nothing(
    minilm_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    args = ("init", str(minilm_path), "--targets", Q0, "--rank", "2", "--device", "cpu")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        # eva with a missing --calib file: an error if the rank calibrated at all.
        r = _run(
            *args,
            "--method",
            "eva",
            "--calib",
            str(tmp_path / "no.txt"),
            "--out",
            str(tmp_path / f"e{rank}"),
        )
        if rank == "1":
            assert (r.exit_code, r.output) == (0, "")
        else:
            assert r.exit_code == 2 and "does not exist" in r.output
        assert not (tmp_path / f"e{rank}").exists()


def test_init_without_source_uses_the_bundled_model(tmp_path) -> None:  # noqa: ANN001
    import json

    from typer.testing import CliRunner

    from spectra.cli.main import app
    from spectra.sources.bundled import bundled_model_path

    out = tmp_path / "o"
    result = CliRunner().invoke(
        app, ["init", "--method", "olora", "--rank", "2", "--targets", "q", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "spectra.json").read_text())
    assert str(bundled_model_path()) in json.dumps(manifest["source"])


def test_relative_source_is_recorded_absolute(tmp_path, monkeypatch, minilm_path) -> None:  # noqa: ANN001
    import json
    import shutil

    from spectra.jobs.init import InitOptions, init_adapter

    src = tmp_path / "m"
    src.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copy(minilm_path / name, src / name)
    monkeypatch.chdir(tmp_path)
    init_adapter("m", InitOptions(out="o", method="olora", rank=2, targets=["q"]))
    manifest = json.loads((tmp_path / "o" / "spectra.json").read_text())
    assert json.dumps(manifest["source"]).find(str(src.resolve())) >= 0
