"""PEFT adapter folders, the streamed residual checkpoint writer and the manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from _adapt_fixtures import one_thread  # noqa: F401
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import save_file

from spectra.errors import SourceError, ValidationError
from spectra.export.manifest import build_manifest, file_sha256, read_manifest, write_manifest
from spectra.export.residual import write_residual_checkpoint
from spectra.formats.peft import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    AdapterContent,
    pattern_keys,
    read_peft_adapter,
    write_peft_adapter,
)
from spectra.formats.safetensors import INDEX_NAME


def _factors(modules: dict[str, tuple[int, int, int]]) -> dict[str, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    return {
        m: (torch.randn(r, n, generator=g), torch.randn(o, r, generator=g))
        for m, (o, n, r) in modules.items()
    }


def test_adapter_folder_has_peft_keys_and_full_path_patterns(tmp_path: Path) -> None:
    mods = {"enc.layer.0.q": (8, 6, 2), "enc.layer.1.q": (8, 6, 4), "enc.layer.1.up": (12, 6, 4)}
    factors = _factors(mods)
    alphas = {"enc.layer.0.q": 2.0, "enc.layer.1.q": 4.0, "enc.layer.1.up": 8.5}
    content = AdapterContent(
        factors, alphas, rslora=True, base_model_name_or_path="/b", dtype=torch.bfloat16
    )
    write_peft_adapter(tmp_path, content)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["init_lora_weights"] is True
    assert cfg["use_rslora"] is True and cfg["bias"] == "none"
    assert cfg["base_model_name_or_path"] == "/b"
    assert cfg["target_modules"] == sorted(mods)
    assert cfg["rank_pattern"] == {"enc.layer.0.q": 2, "enc.layer.1.q": 4, "enc.layer.1.up": 4}
    assert cfg["alpha_pattern"] == {"enc.layer.0.q": 2, "enc.layer.1.q": 4, "enc.layer.1.up": 8.5}
    assert cfg["r"] == 4  # most common
    # PEFT's own resolution finds each module's own key.
    for m in mods:
        assert get_pattern_key(list(cfg["rank_pattern"]), m) == m
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as fh:
        keys = set(fh.keys())
        assert fh.get_tensor(f"{PREFIX}enc.layer.1.up.lora_A.weight").dtype == torch.bfloat16
    assert keys == {f"{PREFIX}{m}.lora_{w}.weight" for m in mods for w in "AB"}
    back = read_peft_adapter(tmp_path)
    for m, (A, B) in factors.items():
        assert torch.equal(back.factors[m][0], A.bfloat16())
        assert torch.equal(back.factors[m][1], B.bfloat16())
    assert back.alpha("enc.layer.1.up") == 8.5
    assert back.scale("enc.layer.1.up") == pytest.approx(8.5 / 2.0)  # rsLoRA: alpha / sqrt(4)


def test_pattern_keys_never_shadow_a_suffix_module() -> None:
    modules = ["a.q", "x.a.q", "layer.1.q", "layer.11.q"]
    keys = pattern_keys(modules)
    assert keys["x.a.q"] == "x.a.q" and keys["a.q"].startswith("^")
    for m in modules:
        assert get_pattern_key(sorted(keys.values()), m) == keys[m]


def test_write_rejects_bad_factors(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="do not form a LoRA"):
        AdapterContent({"m": (torch.zeros(2, 3), torch.zeros(4, 3))}, {"m": 1.0})
    with pytest.raises(ValidationError, match="no adapter factors"):
        AdapterContent({}, {})


def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a PEFT adapter folder"):
        read_peft_adapter(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA"}))
    save_file({"base_model.model.m.lora_A.weight": torch.zeros(1, 2)}, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(SourceError, match="not both"):
        read_peft_adapter(tmp_path)


def _sharded(folder: Path) -> list[Path]:
    """Two shards with an index, mixed dtypes, plus config/tokenizer and a stray .bin."""
    g = torch.Generator().manual_seed(1)
    shard1 = {
        "emb.weight": torch.randn(10, 4, generator=g).bfloat16(),
        "l.0.q.weight": torch.randn(6, 4, generator=g).bfloat16(),
        "l.0.q.bias": torch.randn(6, generator=g),
        "ids": torch.arange(5),
    }
    shard2 = {"l.1.q.weight": torch.randn(6, 4, generator=g), "norm.weight": torch.ones(4)}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    folder.mkdir()
    save_file(shard1, str(folder / names[0]), metadata={"format": "pt"})
    save_file(shard2, str(folder / names[1]), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": 0},
        "weight_map": {**dict.fromkeys(shard1, names[0]), **dict.fromkeys(shard2, names[1])},
    }
    (folder / INDEX_NAME).write_text(json.dumps(index))
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"x")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text("{}")
    return [folder / n for n in names]


def test_residual_checkpoint_replaces_only_targets_and_copies_the_rest(tmp_path: Path) -> None:
    shards = _sharded(tmp_path / "src")
    new = {"l.0.q.weight": torch.full((6, 4), 2.0).bfloat16(), "l.1.q.weight": torch.zeros(6, 4)}
    asked: list[str] = []

    def replace(name: str) -> torch.Tensor | None:
        asked.append(name)
        return new.get(name)

    out = tmp_path / "out"
    done = write_residual_checkpoint(shards, out, replace)
    assert sorted(done) == sorted(new)
    assert sorted(asked) == sorted(
        ["emb.weight", "l.0.q.weight", "l.0.q.bias", "ids", "l.1.q.weight", "norm.weight"]
    )
    assert {p.name for p in out.iterdir()} == {
        shards[0].name,
        shards[1].name,
        INDEX_NAME,
        "config.json",
        "tokenizer.json",
        "1_Pooling",
    }
    assert (out / INDEX_NAME).read_bytes() == (shards[0].parent / INDEX_NAME).read_bytes()
    for shard in shards:
        with safe_open(str(shard), "pt") as a, safe_open(str(out / shard.name), "pt") as b:
            assert list(a.keys()) == list(b.keys()) and a.metadata() == b.metadata()
            for k in a.keys():  # noqa: SIM118
                want = new.get(k, a.get_tensor(k))
                got = b.get_tensor(k)
                assert got.dtype == a.get_tensor(k).dtype and torch.equal(got, want)
        assert (out / shard.name).stat().st_size == shard.stat().st_size


def test_residual_refuses_a_dtype_or_shape_change(tmp_path: Path) -> None:
    shards = _sharded(tmp_path / "src")
    with pytest.raises(ValidationError, match="the source stores torch.bfloat16"):
        write_residual_checkpoint(
            shards, tmp_path / "o", lambda n: torch.zeros(6, 4) if n == "l.0.q.weight" else None
        )


def test_manifest_hashes_and_round_trip(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"spectra" * 1000)
    assert file_sha256(f, chunk=7) == hashlib.sha256(f.read_bytes()).hexdigest()
    m = build_manifest(
        kind="init",
        method="pissa",
        source=str(f),
        source_files=[f],
        options={"rank": 4},
        plan={},
        matrices={"w": {"error": float("nan")}},
    )
    assert m["source_files"][0]["sha256"] == file_sha256(f)
    assert m["matrices"]["w"]["error"] is None  # strict JSON
    assert m["versions"]["torch"] == torch.__version__
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m
    with pytest.raises(SourceError, match="spectra init output"):
        read_manifest(tmp_path / "nowhere")


def test_side_files_copy_only_what_resolves_inside_the_checkpoint(tmp_path: Path) -> None:
    from spectra.export.residual import SkippedSideFileWarning, copy_side_files

    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    (tmp_path / "secret_dir").mkdir()
    (tmp_path / "secret_dir" / "key").write_text("private key")
    src, dst = tmp_path / "ckpt", tmp_path / "out"
    (src / "real").mkdir(parents=True)
    (src / "1_Pooling").mkdir()
    dst.mkdir()
    (src / "config.json").write_text('{"a": 1}')
    (src / "real" / "tok.json").write_text("tokens")
    (src / "tokenizer.json").symlink_to(src / "real" / "tok.json")  # inside: copied
    (src / "special_tokens_map.json").symlink_to(secret)  # outside: skipped
    (src / "vocab.txt").symlink_to(Path("..") / "secret.txt")  # relative, outside: skipped
    (src / "merges.txt").symlink_to(src / "nope")  # dangling: skipped
    (src / "2_Dense").symlink_to(tmp_path / "secret_dir")  # symlinked folder: skipped
    (src / "1_Pooling" / "config.json").write_text("{}")
    (src / "1_Pooling" / "leak.json").symlink_to(secret)  # nested, outside: skipped
    with pytest.warns(SkippedSideFileWarning) as caught:
        copied = copy_side_files(src, dst, [])
    assert copied == ["1_Pooling", "config.json", "tokenizer.json"]
    assert (dst / "tokenizer.json").read_text() == "tokens"
    assert not (dst / "tokenizer.json").is_symlink()  # the content, never a link
    assert sorted(p.name for p in (dst / "1_Pooling").iterdir()) == ["config.json"]
    files = [p for p in dst.rglob("*") if p.is_file()]
    assert "private key" not in [p.read_text() for p in files]
    said = " ".join(str(w.message) for w in caught)
    for name in ("special_tokens_map.json", "vocab.txt", "merges.txt", "2_Dense", "leak.json"):
        assert name in said


def test_side_files_of_a_hub_snapshot_resolve_into_its_blobs(tmp_path: Path) -> None:
    from spectra.export.residual import copy_side_files, side_file_root

    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "blobs" / "e3b0").write_text('{"model_type": "bert"}')
    (snap / "config.json").symlink_to(Path("..") / ".." / "blobs" / "e3b0")
    (tmp_path / "hub" / "other.txt").write_text("not this repo")
    (snap / "vocab.txt").symlink_to(Path("..") / ".." / ".." / "other.txt")
    assert side_file_root(snap) == repo.resolve()
    dst = tmp_path / "out"
    dst.mkdir()
    with pytest.warns(UserWarning, match="vocab.txt"):
        assert copy_side_files(snap, dst, []) == ["config.json"]
    assert json.loads((dst / "config.json").read_text()) == {"model_type": "bert"}


_RSS_CHILD = r"""
import json, sys
from pathlib import Path
import torch
from spectra.export.residual import write_residual_checkpoint

def hwm_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

shards = [Path(p) for p in json.loads(sys.argv[1])]
out = Path(sys.argv[2])
torch.full((8, 8), 1.0) + 1  # warm up torch's allocator before the baseline
try:
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
except OSError:
    pass
before = hwm_kib()
replace = lambda name: torch.full((1024, 1024), 0.5) if name.endswith("q.weight") else None
replaced = write_residual_checkpoint(shards, out, replace)
print(json.dumps({"growth_kib": hwm_kib() - before, "replaced": len(replaced)}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc VmHWM")
def test_residual_export_memory_is_bounded_by_a_tensor_not_the_model(tmp_path: Path) -> None:
    """Two 64 MiB shards of 4 MiB tensors, half of them replaced: the writer's peak RSS growth
    (VmHWM, fresh process) stays under 40 MiB -- one replaced tensor and its bytes (8 MiB), the
    16 MiB copy chunk and slack -- while the checkpoint is 128 MiB."""
    import subprocess
    import sys

    src = tmp_path / "src"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    shards, weight_map = [], {}
    for s in range(2):
        names = [f"l.{s}.{i}.{'q' if i % 2 else 'k'}.weight" for i in range(16)]
        path = src / f"model-{s + 1:05d}-of-00002.safetensors"
        save_file({n: torch.randn(1024, 1024, generator=g) for n in names}, str(path))
        shards.append(path)
        weight_map.update(dict.fromkeys(names, path.name))
    (src / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, json.dumps([str(p) for p in shards]), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    facts = json.loads(run.stdout.strip().splitlines()[-1])
    assert facts["replaced"] == 16
    assert facts["growth_kib"] < 40 * 1024, facts
    with safe_open(str(out / shards[1].name), "pt") as fh:
        assert float(fh.get_tensor("l.1.1.q.weight")[0, 0]) == 0.5
    assert (out / shards[0].name).stat().st_size == shards[0].stat().st_size


def test_side_files_are_a_whitelist_of_config_and_tokenizer_files(tmp_path: Path) -> None:
    """Only what a model folder needs to load (config, tokenizer, sentence-transformers module
    files) is copied; anything else a user keeps next to the weights stays where it is."""
    from spectra.export.residual import copy_side_files

    src, dst = tmp_path / "ckpt", tmp_path / "out"
    src.mkdir()
    dst.mkdir()
    wanted = [
        INDEX_NAME,
        "README.md",
        "added_tokens.json",
        "config.json",
        "config_sentence_transformers.json",
        "generation_config.json",
        "merges.txt",
        "modules.json",
        "sentence_bert_config.json",
        "special_tokens_map.json",
        "spiece.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    ]
    unwanted = ["notes.txt", "train.csv", "id_rsa", "optimizer.pt", "run.sh", "secrets.json"]
    for name in wanted + unwanted:
        (src / name).write_text(name)
    (src / ".env").write_text("TOKEN=x")
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text("{}")
    (src / "1_Pooling" / "notes.txt").write_text("not json")
    (src / "1_Pooling" / "deeper").mkdir()
    (src / "1_Pooling" / "deeper" / "x.json").write_text("{}")
    (src / "2_Dense").mkdir()
    (src / "2_Dense" / "pytorch_model.bin").write_bytes(b"weights")
    (src / "data").mkdir()
    (src / "data" / "config.json").write_text("{}")
    copied = copy_side_files(src, dst, [])
    assert copied == sorted([*wanted, "1_Pooling", "2_Dense"])
    assert sorted(p.name for p in dst.iterdir()) == copied
    assert [p.name for p in (dst / "1_Pooling").iterdir()] == ["config.json"]
    assert list((dst / "2_Dense").iterdir()) == []
    assert (dst / "config.json").read_text() == "config.json"


def test_a_single_file_source_gets_no_side_files(tmp_path: Path) -> None:
    """`spectra init ~/Downloads/model.safetensors`: the residual base is the weights file
    alone, never the rest of the Downloads folder."""
    from spectra.jobs.init import InitOptions, init_adapter

    name = "encoder.layer.0.attention.self.query"
    g = torch.Generator().manual_seed(0)
    downloads = tmp_path / "Downloads"
    downloads.mkdir()
    save_file({f"{name}.weight": torch.randn(8, 8, generator=g)}, str(downloads / "m.safetensors"))
    (downloads / "config.json").write_text("{}")
    (downloads / "tokenizer.json").write_text("{}")
    (downloads / "tax_return.pdf").write_text("private")
    res = init_adapter(
        downloads / "m.safetensors", InitOptions(out=tmp_path / "o", rank=2, targets=[name])
    )
    assert res.residual_dir is not None
    assert [p.name for p in res.residual_dir.iterdir()] == ["m.safetensors"]
    # The same weights as a folder source bring their config and tokenizer along.
    folder = init_adapter(downloads, InitOptions(out=tmp_path / "f", rank=2, targets=[name]))
    assert folder.residual_dir is not None
    got = sorted(p.name for p in folder.residual_dir.iterdir())
    assert got == ["config.json", "m.safetensors", "tokenizer.json"]
