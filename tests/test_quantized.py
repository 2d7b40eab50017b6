"""Quantized safetensors checkpoints: each scheme read through spectra against an independent
dequantization (the format's own library where it runs on CPU: transformers for fp8 blocks and
MXFP4, compressed-tensors, bitsandbytes; otherwise a reference packer written from the format's
reference code in _quant_fixtures), planted spectra, detection and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _quant_fixtures import (
    awq_tensors,
    fp8_block_quantize,
    gptq_tensors,
    mxfp4_quantize,
    planted,
    write_checkpoint,
)
from safetensors.torch import save_file

from spectra.errors import SourceError
from spectra.sources.checkpoint import Checkpoint

Q = "model.layers.0.self_attn.q_proj"
# compressed-tensors and bitsandbytes are dev dependencies (pyproject.toml); a venv set up before
# they were added skips their reference tests until `make setup` reinstalls it.
NEEDS_SETUP = "dev dependency missing: run `make setup` (pip install -e '.[dev]')"
FP8_CONFIG = {"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e4m3"}


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    with Checkpoint.open(folder) as ckpt:
        return {m.key: ckpt.read(m) for m in ckpt.matrices()}


# -- fp8 with block scales ---------------------------------------------------------------------
def test_fp8_block_matches_transformers_dequantization(tmp_path: Path) -> None:
    from transformers.integrations import finegrained_fp8

    W = torch.randn(300, 260)  # not multiples of 128: partial edge blocks
    codes, scale, deq = fp8_block_quantize(W)
    folder = write_checkpoint(
        tmp_path / "m",
        {f"{Q}.weight": codes, f"{Q}.weight_scale_inv": scale, "model.norm.weight": torch.ones(4)},
        FP8_CONFIG,
    )
    got = read_all(folder)
    assert list(got) == [f"{Q}.weight"]  # the scale is no matrix
    reference = finegrained_fp8._dequantize_fp8_weight(codes, scale, [128, 128], torch.float32)
    torch.testing.assert_close(got[f"{Q}.weight"], reference, rtol=0, atol=0)
    torch.testing.assert_close(got[f"{Q}.weight"], deq, rtol=0, atol=0)


def test_fp8_block_scales_are_never_read_raw(tmp_path: Path) -> None:
    """Regression (issue 16): the spectrum of fp8 codes without their scales is wrong."""
    W = planted(256, 256) * 1e-3  # small weights: the codes are ~1e3 times the values
    codes, scale, deq = fp8_block_quantize(W)
    tensors = {f"{Q}.weight": codes, f"{Q}.weight_scale_inv": scale}
    for config in (FP8_CONFIG, None):  # detected from the tensors without a config too
        folder = write_checkpoint(tmp_path / str(config is None), tensors, config)
        with Checkpoint.open(folder) as ckpt:
            (m,) = ckpt.matrices()
            assert m.encoded is not None and m.storage == "fp8-block 8-bit 128x128"
            got = ckpt.read(m)
        assert torch.equal(got, deq)
        assert not torch.allclose(got, codes.to(torch.float32), rtol=0.5)


def test_fp8_weight_without_its_scale_is_refused(tmp_path: Path) -> None:
    codes, _, _ = fp8_block_quantize(torch.randn(128, 128))
    folder = write_checkpoint(tmp_path / "m", {f"{Q}.weight": codes}, FP8_CONFIG)
    with pytest.raises(SourceError, match=r"has no scale tensor.*weight_scale_inv"):
        Checkpoint.open(folder)


# -- GPTQ and AWQ ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bits", "v1", "act_order", "sym"),
    [
        (4, True, False, True),
        (4, True, True, False),
        (4, False, False, False),
        (8, True, False, True),
        (2, True, False, False),
    ],
)
def test_gptq_matches_reference_pack(
    tmp_path: Path, bits: int, v1: bool, act_order: bool, sym: bool
) -> None:
    W = torch.randn(48, 256)
    parts, deq = gptq_tensors(W, bits, 64, v1=v1, act_order=act_order, sym=sym)
    tensors = {f"{Q}.{k}": v for k, v in parts.items()}
    tensors[f"{Q}.bias"] = torch.zeros(48, dtype=torch.float16)
    qc = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": 64,
        "desc_act": act_order,
        "sym": sym,
        "checkpoint_format": "gptq" if v1 else "gptq_v2",
    }
    got = read_all(write_checkpoint(tmp_path / "m", tensors, qc))
    assert list(got) == [f"{Q}.weight"]
    torch.testing.assert_close(got[f"{Q}.weight"], deq, rtol=0, atol=0)
    assert (got[f"{Q}.weight"] - W).abs().max() < 2 * W.abs().max() / 2**bits + 0.05


def test_awq_matches_reference_pack(tmp_path: Path) -> None:
    W = torch.randn(64, 256)
    parts, deq = awq_tensors(W, 128)
    tensors = {f"{Q}.{k}": v for k, v in parts.items()}
    qc = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 128,
        "version": "gemm",
        "zero_point": True,
    }
    got = read_all(write_checkpoint(tmp_path / "m", tensors, qc))
    torch.testing.assert_close(got[f"{Q}.weight"], deq, rtol=0, atol=0)
    # the interleave matters: read as GPTQ-style sequential nibbles the columns come out permuted
    assert (got[f"{Q}.weight"] - W).abs().max() < 0.5


# -- MXFP4 (gpt-oss) ---------------------------------------------------------------------------
def test_mxfp4_expert_stack_matches_transformers(tmp_path: Path) -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    E, rows, G = 3, 24, 4  # gate_up (E, 2I, hidden/32, 16) -> (E, 24, 128)
    blocks = torch.randint(0, 256, (E, rows, G, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(118, 131, (E, rows, G), dtype=torch.uint8, generator=g)
    stem = "model.layers.0.mlp.experts.gate_up_proj"
    tensors = {
        f"{stem}_blocks": blocks,
        f"{stem}_scales": scales,
        "model.layers.0.mlp.router.weight": torch.randn(E, 128),
    }
    folder = write_checkpoint(tmp_path / "m", tensors, {"quant_method": "mxfp4"})
    reference = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    with Checkpoint.open(folder) as ckpt:
        experts = [m for m in ckpt.matrices() if m.role == "expert"]
        assert [m.key for m in experts] == [f"{stem}[expert={e}]" for e in range(E)]
        assert all(m.shape == (128, rows) and m.storage == "mxfp4 4-bit 32" for m in experts)
        for e, m in enumerate(experts):
            torch.testing.assert_close(ckpt.read(m), reference[e], rtol=0, atol=0)


# -- detection and errors ----------------------------------------------------------------------
def test_unknown_quantization_method_is_one_line(tmp_path: Path) -> None:
    folder = write_checkpoint(
        tmp_path / "m", {f"{Q}.weight": torch.randn(8, 8)}, {"quant_method": "hqq", "nbits": 4}
    )
    with pytest.raises(SourceError, match=r"quantization method 'hqq' .* is not supported"):
        Checkpoint.open(folder)


def test_unknown_quantization_cli_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from spectra.cli.main import app

    folder = write_checkpoint(
        tmp_path / "m", {f"{Q}.weight": torch.randn(8, 8)}, {"quant_method": "quanto"}
    )
    result = CliRunner().invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "'quanto'" in lines[0], result.output


def test_packed_tensors_without_config_are_refused(tmp_path: Path) -> None:
    parts, _ = gptq_tensors(torch.randn(16, 64), 4, 32)
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({f"{Q}.{k}": v for k, v in parts.items()}, str(folder / "model.safetensors"))
    with pytest.raises(SourceError, match=r"qweight.*no config.json with a quantization_config"):
        Checkpoint.open(folder)


def test_corrupt_part_shape_is_a_source_error(tmp_path: Path) -> None:
    parts, _ = gptq_tensors(torch.randn(16, 64), 4, 32)
    parts["scales"] = parts["scales"][:1]  # one group of scales for two groups
    folder = write_checkpoint(
        tmp_path / "m",
        {f"{Q}.{k}": v for k, v in parts.items()},
        {"quant_method": "gptq", "bits": 4, "group_size": 32},
    )
    with Checkpoint.open(folder) as ckpt, pytest.raises(SourceError, match=r"scales.*shape"):
        ckpt.read(ckpt.matrices()[0])


def test_config_json_written_next_to_weights(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "m", {f"{Q}.weight": torch.randn(4, 4)}, None)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    with Checkpoint.open(folder) as ckpt:
        assert ckpt.quantization.method is None and ckpt.matrices()[0].encoded is None


def test_inspect_shows_storage_and_hides_side_tensors(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from spectra.cli.main import app

    parts, _ = gptq_tensors(torch.randn(32, 128), 4, 64)
    tensors = {f"{Q}.{k}": v for k, v in parts.items()}
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.randn(32, 128).to(torch.bfloat16)
    folder = write_checkpoint(
        tmp_path / "m", tensors, {"quant_method": "gptq", "bits": 4, "group_size": 64}
    )
    result = CliRunner().invoke(app, ["inspect", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    mats = {m["key"]: m for m in json.loads(result.output)["matrices"]}
    assert set(mats) == {f"{Q}.weight", "model.layers.0.self_attn.k_proj.weight"}
    q = mats[f"{Q}.weight"]
    assert q["storage"] == {"scheme": "gptq", "bits": 4, "block": "group 64"}
    assert q["shape"] == [32, 128] and q["role"] == "q" and q["layer"] == 0
    assert q["parts"] == [f"{Q}.qweight", f"{Q}.qzeros", f"{Q}.scales", f"{Q}.g_idx"]
    assert q["bytes"] == sum(v.numel() * v.element_size() for v in parts.values())
    assert "storage" not in mats["model.layers.0.self_attn.k_proj.weight"]
    table = CliRunner().invoke(app, ["inspect", str(folder)], env={"COLUMNS": "200"})
    assert "gptq 4-bit group 64" in table.output and "storage" in table.output


# -- compressed-tensors (its own compressors are the reference) --------------------------------
def _ct_case(fmt: str, args: dict[str, object], W: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Compress W with compressed-tensors' own compressor for `fmt`; return the stored module
    tensors and the library's decompression."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    qargs = QuantizationArgs(**args)
    scheme = QuantizationScheme(targets=["Linear"], weights=qargs)
    rows, cols = W.shape
    g = torch.Generator().manual_seed(3)
    shape = {
        "tensor": (1,),
        "channel": (rows, 1),
        "group": (rows, cols // int(qargs.group_size or 1)),
        "block": (-(-rows // 128), -(-cols // 128)),
    }[str(args["strategy"])]
    qmax = 448.0 if qargs.type == "float" else 2 ** (qargs.num_bits - 1) - 1
    scale = (W.abs().max() / qmax) * (0.5 + torch.rand(shape, generator=g))
    state = {"weight": W, "weight_scale": scale.to(torch.float32)}
    if not qargs.symmetric:
        lo = -(2 ** (qargs.num_bits - 1))
        state["weight_zero_point"] = torch.randint(lo, -lo, shape, generator=g).to(torch.int8)
    compressor = BaseCompressor.load_from_registry(fmt)
    stored = compressor.compress(state, scheme)
    reference = compressor.decompress(dict(stored), scheme)["weight"]
    return stored, reference.to(torch.float32)


@pytest.mark.parametrize(
    ("fmt", "args"),
    [
        (
            "pack-quantized",
            {
                "num_bits": 4,
                "type": "int",
                "symmetric": False,
                "strategy": "group",
                "group_size": 32,
            },
        ),
        (
            "pack-quantized",
            {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"},
        ),
        (
            "pack-quantized",
            {
                "num_bits": 8,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": 64,
            },
        ),
        ("int-quantized", {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}),
        (
            "float-quantized",
            {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor"},
        ),
        (
            "float-quantized",
            {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"},
        ),
        (
            "float-quantized",
            {
                "num_bits": 8,
                "type": "float",
                "symmetric": True,
                "strategy": "block",
                "block_structure": [128, 128],
            },
        ),
    ],
)
def test_compressed_tensors_matches_its_decompressor(
    tmp_path: Path, fmt: str, args: dict[str, object]
) -> None:
    pytest.importorskip("compressed_tensors", reason=NEEDS_SETUP)
    from compressed_tensors.quantization import QuantizationArgs

    W = torch.randn(200, 192)
    stored, reference = _ct_case(fmt, args, W)
    tensors = {f"{Q}.{k}": v for k, v in stored.items()}
    qc = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": QuantizationArgs(**args).model_dump()}
        },
        "ignore": ["lm_head"],
    }
    folder = write_checkpoint(tmp_path / "m", tensors, json.loads(json.dumps(qc, default=str)))
    got = read_all(folder)
    assert list(got) == [f"{Q}.weight"]
    torch.testing.assert_close(got[f"{Q}.weight"], reference, rtol=0, atol=0)


# -- bitsandbytes (its own quantize_4bit / dequantize_4bit are the reference) ------------------
@pytest.mark.parametrize(
    ("quant_type", "nested", "blocksize"),
    [("nf4", True, 64), ("nf4", False, 64), ("fp4", True, 128), ("fp4", False, 64)],
)
def test_bitsandbytes_4bit_matches_its_dequantize(
    tmp_path: Path, quant_type: str, nested: bool, blocksize: int
) -> None:
    F = pytest.importorskip("bitsandbytes.functional", reason=NEEDS_SETUP)

    W = torch.randn(96, 200)  # 19200 values: the last block is partial for blocksize 128
    codes, state = F.quantize_4bit(
        W, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested
    )
    reference = F.dequantize_4bit(codes, state).to(torch.float32)
    # what transformers' save_pretrained writes: the codes, then the packed quant state
    tensors = {f"{Q}.weight": codes}
    tensors.update({f"{Q}.weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    qc = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": nested,
    }
    folder = write_checkpoint(tmp_path / "m", tensors, qc)
    with Checkpoint.open(folder) as ckpt:
        (m,) = ckpt.matrices()
        assert m.key == f"{Q}.weight" and m.shape == (96, 200) and m.role == "q"
        assert m.storage == f"bnb-{quant_type}{' nested' if nested else ''} 4-bit {blocksize}"
        torch.testing.assert_close(ckpt.read(m), reference, rtol=0, atol=0)


def test_bitsandbytes_int8_matches_its_dequantize(tmp_path: Path) -> None:
    F = pytest.importorskip("bitsandbytes.functional", reason=NEEDS_SETUP)

    W = torch.randn(64, 96)
    codes, scb, _ = F.int8_vectorwise_quant(W)
    reference = F.int8_vectorwise_dequant(codes, scb).to(torch.float32)
    qc = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    folder = write_checkpoint(tmp_path / "m", {f"{Q}.weight": codes, f"{Q}.SCB": scb}, qc)
    got = read_all(folder)
    torch.testing.assert_close(got[f"{Q}.weight"], reference, rtol=0, atol=0)


# -- planted spectra: quantize a known spectrum with the reference quantizer, read it back -----
def _planted_case(scheme: str, W: torch.Tensor) -> tuple[dict, dict | None, torch.Tensor]:
    """Stored tensors, quantization_config and the reference dequantization of W."""
    if scheme == "fp8-block":
        codes, scale, deq = fp8_block_quantize(W)
        return {"weight": codes, "weight_scale_inv": scale}, FP8_CONFIG, deq
    if scheme == "gptq":
        parts, deq = gptq_tensors(W, 4, 32, act_order=True)
        return parts, {"quant_method": "gptq", "bits": 4, "group_size": 32}, deq
    if scheme == "awq":
        parts, deq = awq_tensors(W, 32)
        return parts, {"quant_method": "awq", "bits": 4, "group_size": 32}, deq
    if scheme == "bnb-nf4":
        F = pytest.importorskip("bitsandbytes.functional", reason=NEEDS_SETUP)

        codes, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
        parts = {"weight": codes}
        parts.update({f"weight.{k}": v for k, v in state.as_dict(packed=True).items()})
        return (
            parts,
            {"quant_method": "bitsandbytes", "load_in_4bit": True},
            (F.dequantize_4bit(codes, state).to(torch.float32)),
        )
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = mxfp4_quantize(W)
    deq = convert_moe_packed_tensors(blocks[None], scales[None], dtype=torch.float32)[0].T
    return {"weight_blocks": blocks, "weight_scales": scales}, {"quant_method": "mxfp4"}, deq


@pytest.mark.parametrize("scheme", ["fp8-block", "gptq", "awq", "bnb-nf4", "mxfp4"])
def test_planted_spectrum_survives_reading(tmp_path: Path, scheme: str) -> None:
    """The spectrum spectra computes from the quantized file is the float64 spectrum of the
    reference dequantization, and close to the planted one (1, 0.9, 0.81, ...)."""
    from spectra.linalg.decompose import SpectrumOptions
    from spectra.linalg.engine import compute_spectra

    W = planted(64, 128, seed=7) * 0.05
    parts, qc, deq = _planted_case(scheme, W)
    folder = write_checkpoint(tmp_path / "m", {f"{Q}.{k}": v for k, v in parts.items()}, qc)
    with Checkpoint.open(folder) as ckpt:
        assert [(m.key, m.role, m.shape) for m in ckpt.matrices()] == [
            (f"{Q}.weight", "q", (64, 128))
        ]
        (spectrum,) = compute_spectra(ckpt, options=SpectrumOptions(mode="values"))
    want = torch.linalg.svdvals(deq.double())
    got = spectrum.values.double()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * float(want[0]))
    planted_values = 0.05 * 0.9 ** torch.arange(64, dtype=torch.float64)
    assert abs(float(got[0]) - 0.05) < 0.2 * 0.05  # the top of the planted spectrum survives
    assert float((got[:8] - planted_values[:8]).abs().max()) < 0.1 * 0.05


def test_parts_in_two_shards_and_cached_rerun(tmp_path: Path) -> None:
    """A weight and its scale in different shards (an index splits them): read, keyed by both
    shards' digests, and a cached rerun gives the same spectrum without decoding again."""
    from spectra.linalg.cache import SpectrumCache
    from spectra.linalg.decompose import SpectrumOptions
    from spectra.linalg.engine import compute_spectra

    codes, scale, deq = fp8_block_quantize(planted(128, 256, seed=2))
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({f"{Q}.weight": codes}, str(folder / "a.safetensors"))
    save_file({f"{Q}.weight_scale_inv": scale}, str(folder / "b.safetensors"))
    index = {
        "weight_map": {f"{Q}.weight": "a.safetensors", f"{Q}.weight_scale_inv": "b.safetensors"}
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"quantization_config": FP8_CONFIG}))
    cache = SpectrumCache(tmp_path / "cache")
    with Checkpoint.open(folder) as ckpt:
        (m,) = ckpt.matrices()
        assert torch.equal(ckpt.read(m), deq)
        key = ckpt.content_key(m)
        assert key.count("+") == 1 and "fp8-block" in key
        first = list(compute_spectra(ckpt, options=SpectrumOptions(), cache=cache))
        again = list(compute_spectra(ckpt, options=SpectrumOptions(), cache=cache))
    want = torch.linalg.svdvals(deq.double())
    torch.testing.assert_close(first[0].values.double(), want, rtol=0, atol=1e-6 * float(want[0]))
    assert not first[0].from_cache and again[0].from_cache
    assert torch.equal(first[0].values, again[0].values)


def test_compressed_tensors_group_index_act_order(tmp_path: Path) -> None:
    """pack-quantized with `weight_g_idx` (written by compressed-tensors before its actorder
    "group" was removed; vLLM still loads it): column j uses group g_idx[j]. Reference: the
    codes packed by compressed-tensors' own packer, the value computed per column."""
    pytest.importorskip("compressed_tensors", reason=NEEDS_SETUP)
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs

    g = torch.Generator().manual_seed(4)
    rows, cols, size = 16, 128, 32
    q = torch.randint(-8, 8, (rows, cols), generator=g).to(torch.int8)
    scale = torch.rand(rows, cols // size, generator=g) + 0.1
    g_idx = torch.randperm(cols, generator=g) // size  # an act-order permutation of the groups
    reference = q.to(torch.float32) * scale[:, g_idx]
    tensors = {
        f"{Q}.weight_packed": pack_to_int32(q, 4),
        f"{Q}.weight_scale": scale,
        f"{Q}.weight_shape": torch.tensor([rows, cols]),
        f"{Q}.weight_g_idx": g_idx.to(torch.int32),
    }
    args = QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=size
    )
    qc = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args.model_dump()}},
    }
    got = read_all(
        write_checkpoint(tmp_path / "m", tensors, json.loads(json.dumps(qc, default=str)))
    )
    torch.testing.assert_close(got[f"{Q}.weight"], reference, rtol=0, atol=0)
