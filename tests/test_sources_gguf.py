"""The GGUF source: llama.cpp names to Hugging Face names, the q/k row permutation undone (GQA
included), the config, and the result checked end to end against transformers' own Llama."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _gguf_fixtures import (
    encode,
    hf_to_gguf_permute,
    llama_weights,
    tiny_llama_gguf,
    write_gguf,
)

from spectra.sources.checkpoint import Checkpoint
from spectra.sources.gguf import GgufPermutationWarning, hf_name

SIZES = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 96, "vocab": 128}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """A tiny GQA llama stored as F32 GGUF (exact values) the way convert_hf_to_gguf.py does."""
    weights = llama_weights(**SIZES)
    folder = tmp_path_factory.mktemp("gguf")
    path = tiny_llama_gguf(
        folder / "tiny.gguf", weights, heads=4, kv_heads=2, type_name="F32", tied=True
    )
    return path, weights


def test_names_roles_and_config(tiny: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, weights = tiny
    with Checkpoint.open(path) as ckpt:
        mats = {m.key: m for m in ckpt.matrices()}
        plain = {t.name for t in ckpt.tensors()}
        config = ckpt.config
    expected = {k for k, v in weights.items() if v.ndim == 2}
    assert set(mats) == expected  # tied: no lm_head
    assert plain == {k for k, v in weights.items() if v.ndim == 1}
    for key, m in mats.items():
        assert m.shape == weights[key].shape
    assert mats["model.layers.1.self_attn.k_proj.weight"].role == "k"
    assert mats["model.layers.1.self_attn.k_proj.weight"].layer == 1
    assert mats["model.layers.0.mlp.down_proj.weight"].role == "down"
    assert mats["model.embed_tokens.weight"].role == "embedding"
    assert config["hidden_size"] == 64 and config["num_attention_heads"] == 4
    assert config["num_key_value_heads"] == 2 and config["num_hidden_layers"] == 2
    assert config["intermediate_size"] == 96 and config["vocab_size"] == 128
    assert config["tie_word_embeddings"] is True and config["model_type"] == "llama"


def test_hf_name_mapping() -> None:
    assert hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_name("blk.0.attn_output.weight") == "model.layers.0.self_attn.o_proj.weight"
    assert hf_name("blk.3.ffn_gate.weight") == "model.layers.3.mlp.gate_proj.weight"
    assert hf_name("blk.3.attn_k.bias") == "model.layers.3.self_attn.k_proj.bias"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("rope_freqs.weight") == "rope_freqs.weight"  # no HF counterpart: kept
    assert hf_name("blk.1.unknown_thing.weight") == "blk.1.unknown_thing.weight"


def test_qk_permutation_round_trip(tiny: tuple[Path, dict[str, np.ndarray]]) -> None:
    """q (4 heads) and k (2 KV heads) come back exactly as the Hugging Face matrices, although the
    file stores them permuted (checked: the stored rows differ)."""
    path, weights = tiny
    with Checkpoint.open(path) as ckpt:
        for key, value in weights.items():
            got = ckpt.read(key)
            assert torch.equal(got, torch.from_numpy(value)), key
    from gguf import GGUFReader

    stored = {t.name: np.array(t.data) for t in GGUFReader(str(path)).tensors}
    q_hf = weights["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(stored["blk.0.attn_q.weight"], q_hf)
    assert np.array_equal(stored["blk.0.attn_q.weight"], hf_to_gguf_permute(q_hf, 4))


def test_quantized_qk_are_unpermuted_after_decoding(tmp_path: Path) -> None:
    """Q8_0: the matrix read is the dequantized stored matrix with its rows un-permuted."""
    from _gguf_fixtures import qtype
    from gguf.quants import dequantize

    weights = llama_weights(**SIZES, seed=1)
    path = tiny_llama_gguf(tmp_path / "q8.gguf", weights, heads=4, kv_heads=2, type_name="Q8_0")
    for key, heads in (
        ("model.layers.1.self_attn.q_proj.weight", 4),
        ("model.layers.1.self_attn.k_proj.weight", 2),
    ):
        stored = encode(hf_to_gguf_permute(weights[key], heads), "Q8_0")
        deq = dequantize(stored, qtype("Q8_0"))
        d = deq.shape[0] // heads
        inverse = [h * d + 2 * j + t for h in range(heads) for t in range(2) for j in range(d // 2)]
        with Checkpoint.open(path) as ckpt:
            got = ckpt.read(key).numpy()
        assert np.array_equal(got, deq[inverse])
        assert np.abs(got - weights[key]).max() < 0.02  # and close to the original


def test_gguf_weights_give_transformers_llama_the_same_logits(
    tiny: tuple[Path, dict[str, np.ndarray]],
) -> None:
    """A LlamaForCausalLM built from the config spectra derives from the GGUF metadata, loaded
    with the tensors spectra reads under their mapped names, computes the same logits as the
    model with the original weights: names, shapes and the rotary q/k layout all line up."""
    transformers = pytest.importorskip("transformers")
    path, weights = tiny
    with Checkpoint.open(path) as ckpt:
        config = transformers.LlamaConfig(**ckpt.config)
        state = {m.key: ckpt.read(m) for m in ckpt.matrices()}
        state.update({t.name: ckpt.read(t) for t in ckpt.tensors()})
    torch.manual_seed(0)
    ours = transformers.LlamaForCausalLM(config).eval()
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # tied to the embedding
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    ids = torch.randint(0, SIZES["vocab"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids).logits, reference(ids).logits
    assert torch.equal(a, b)
    # the q/k un-permutation matters: without it the logits differ
    scrambled = dict(state)
    key = "model.layers.0.self_attn.q_proj.weight"
    scrambled[key] = torch.from_numpy(hf_to_gguf_permute(state[key].numpy(), 4))
    ours.load_state_dict(scrambled, strict=False)
    with torch.no_grad():
        assert not torch.allclose(ours(ids).logits, b, atol=1e-4)


def test_untied_output_is_lm_head(tmp_path: Path) -> None:
    weights = llama_weights(**SIZES)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"][::-1].copy()
    path = tiny_llama_gguf(tmp_path / "u.gguf", weights, heads=4, kv_heads=2, tied=False)
    with Checkpoint.open(path) as ckpt:
        head = next(m for m in ckpt.matrices() if m.key == "lm_head.weight")
        assert head.role == "lm_head" and ckpt.config["tie_word_embeddings"] is False


def test_unpermuted_and_unknown_architectures(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((64, 64)).astype(np.float32)
    tensors = [("blk.0.attn_q.weight", q, "F32")]
    meta = {"attention.head_count": 4, "attention.head_count_kv": 2}
    for arch, warns in (("qwen2", False), ("mystery", True)):
        path = write_gguf(
            tmp_path / f"{arch}.gguf",
            tensors,
            arch=arch,
            ints={f"{arch}.{k}": v for k, v in meta.items()},
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Checkpoint.open(path) as ckpt:
                got = ckpt.read("model.layers.0.self_attn.q_proj.weight")
        assert torch.equal(got, torch.from_numpy(q))  # as stored
        assert any(issubclass(w.category, GgufPermutationWarning) for w in caught) is warns


def test_head_count_that_does_not_fit_is_one_line(tmp_path: Path) -> None:
    from spectra.errors import SourceError

    weights = llama_weights(**SIZES)
    path = tiny_llama_gguf(tmp_path / "h.gguf", weights, heads=4, kv_heads=2, type_name="F32")
    data = bytearray(path.read_bytes())
    key = b"llama.attention.head_count_kv"
    at = data.index(key) + len(key) + 4  # value type u32, then the u32 value
    data[at : at + 4] = (5).to_bytes(4, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    with Checkpoint.open(bad) as ckpt, pytest.raises(SourceError) as err:
        ckpt.read("model.layers.0.self_attn.k_proj.weight")
    assert "5 heads" in str(err.value) and "\n" not in str(err.value)


def test_folder_with_only_gguf_files_names_them(tmp_path: Path) -> None:
    from spectra.errors import SourceError

    weights = llama_weights(**SIZES)
    tiny_llama_gguf(tmp_path / "model-Q8_0.gguf", weights, heads=4, kv_heads=2)
    with pytest.raises(SourceError) as err:
        Checkpoint.open(tmp_path)
    assert "model-Q8_0.gguf" in str(err.value) and "give one .gguf file" in str(err.value)


def test_expert_stack_is_one_matrix_per_expert(tmp_path: Path) -> None:
    """ffn_gate_exps (E, out, in) as Q8_0: expert e reads as the dequantized slice e."""
    from _gguf_fixtures import qtype
    from gguf.quants import dequantize

    rng = np.random.default_rng(4)
    stack = rng.standard_normal((3, 32, 64)).astype(np.float32)
    stored = encode(stack, "Q8_0")
    path = write_gguf(
        tmp_path / "moe.gguf",
        [("blk.1.ffn_gate_exps.weight", stored, "Q8_0")],
        arch="qwen2moe",
        ints={"qwen2moe.embedding_length": 64},
    )
    deq = dequantize(stored, qtype("Q8_0"))
    with Checkpoint.open(path) as ckpt:
        mats = ckpt.matrices()
        assert [m.key for m in mats] == [
            f"model.layers.1.mlp.experts.gate_proj[expert={e}]" for e in range(3)
        ]
        assert {(m.role, m.expert_role, m.layer, m.shape) for m in mats} == {
            ("expert", "gate", 1, (32, 64))
        }
        for e, m in enumerate(mats):
            assert torch.equal(ckpt.read(m), torch.from_numpy(deq[e]))


def test_moe_router_and_shared_expert_names(tmp_path: Path) -> None:
    """llama.cpp's qwen2moe names: the router, the shared expert and its gate map to the
    Hugging Face names and roles (router, shared_expert) a safetensors checkpoint has."""
    rng = np.random.default_rng(5)

    def f32(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    path = write_gguf(
        tmp_path / "moe.gguf",
        [
            ("blk.0.ffn_gate_inp.weight", f32(4, 64), "F32"),
            ("blk.0.ffn_gate_inp_shexp.weight", f32(1, 64), "F32"),
            ("blk.0.ffn_gate_shexp.weight", f32(32, 64), "F32"),
            ("blk.0.ffn_up_shexp.weight", f32(32, 64), "F32"),
            ("blk.0.ffn_down_shexp.weight", f32(64, 32), "F32"),
        ],
        arch="qwen2moe",
        ints={"qwen2moe.embedding_length": 64},
    )
    with Checkpoint.open(path) as ckpt:
        got = {m.key: (m.role, m.expert, m.expert_role) for m in ckpt.matrices()}
    p = "model.layers.0.mlp."
    assert got == {
        p + "gate.weight": ("router", None, None),
        p + "shared_expert_gate.weight": ("router", None, None),
        p + "shared_expert.gate_proj.weight": ("shared_expert", None, "gate"),
        p + "shared_expert.up_proj.weight": ("shared_expert", None, "up"),
        p + "shared_expert.down_proj.weight": ("shared_expert", None, "down"),
    }
