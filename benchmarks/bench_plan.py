"""`spectra plan` cost: cold (no cache) against `spectra report`'s spectra, and warm (from the cache
a report filled) for every kind; optionally the reference tool cognitivecomputations/spectrum run
on the bundled MiniLM against `--for spectrum`.

    .venv/bin/python benchmarks/bench_plan.py [--hidden 2048] [--inter 5632] [--layers 22]
        [--vocab 32000] [--dir /tmp/spectra-bench-plan] [--threads 2]
        [--spectrum-repo PATH]   # a checkout of cognitivecomputations/spectrum (spectrum.py)

Writes a synthetic Llama-shaped bf16 checkpoint (kept for reruns; the defaults are TinyLlama-1.1B's
shapes: 22 layers, 1.1e9 parameters, 2.2 GB), then in this process:
1. `analyze()` (what `spectra report` computes) with an empty cache: the report's cold cost;
2. `spectra plan --for spectrum` with another empty cache: a cold plan;
3. every kind from the cache step 1 filled: the warm cost (peft with the energy allocator).
Prints one table (seconds). Not a test: numbers depend on the machine and its load.

With `--spectrum-repo`, imports that checkout's `spectrum.py` (its interactive `prompt_toolkit`
dialogs stubbed out: never called), scans every weight of the bundled MiniLM with its
`ModelModifier` (loaded as `transformers.AutoModel`, float32), writes its JSON and YAML in a
scratch folder and compares them with `spectra plan --for spectrum`: the largest relative SNR
difference over the 2-D matrices and whether the YAML lists the same modules per type.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

from spectra.jobs.plan import KINDS, PlanOptions, make_plan
from spectra.jobs.report import analyze
from spectra.sources.bundled import bundled_model_path


def _spiky(shape: tuple[int, int], g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Gaussian entries with one in 10^4 made 40x larger: weight outliers for OwLore's ratio."""
    w = torch.randn(*shape, generator=g) * scale
    idx = torch.randint(w.numel(), (max(1, w.numel() // 10_000),), generator=g)
    w.view(-1)[idx] *= 40.0
    return w.bfloat16()


def write_checkpoint(folder: Path, hidden: int, inter: int, layers: int, vocab: int) -> Path:
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shards = layers + 1
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        if i == layers:
            t = {
                "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g).bfloat16(),
                "model.norm.weight": torch.ones(hidden).bfloat16(),
                "lm_head.weight": torch.randn(vocab, hidden, generator=g).bfloat16(),
            }
        else:
            p = f"model.layers.{i}."
            t = {
                p + f"self_attn.{k}.weight": _spiky((hidden, hidden), g, hidden**-0.5)
                for k in ("q_proj", "k_proj", "v_proj", "o_proj")
            }
            for k, shape in (("gate", (inter, hidden)), ("up", (inter, hidden))):
                t[p + f"mlp.{k}_proj.weight"] = _spiky(shape, g)
            t[p + "mlp.down_proj.weight"] = _spiky((hidden, inter), g)
            t[p + "input_layernorm.weight"] = torch.ones(hidden).bfloat16()
        save_file(t, str(folder / name))
        weight_map.update(dict.fromkeys(t, name))
    body = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(body))
    return folder


def _timed(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(ckpt: Path, scratch: Path) -> list[tuple[str, float]]:
    rows = []
    warm = scratch / "cache-warm"
    rows.append(("report spectra (analyze), cold", _timed(lambda: analyze(ckpt, cache=warm))))
    cold = PlanOptions(kind="spectrum", out=scratch / "cold.yaml", force=True)
    rows.append(
        ("plan --for spectrum, cold", _timed(lambda: make_plan(ckpt, cold, cache=scratch / "c2")))
    )
    for kind in KINDS:
        out = scratch / (kind if kind == "peft" else f"{kind}.json")
        opts = PlanOptions(
            kind=kind, out=out, force=True, allocator="energy" if kind == "peft" else None
        )
        rows.append(
            (f"plan --for {kind}, warm", _timed(lambda o=opts: make_plan(ckpt, o, cache=warm)))
        )
    return rows


def compare_with_spectrum_tool(repo: Path, scratch: Path) -> dict[str, object]:
    """Run the reference tool's scan on MiniLM and compare with spectra's plan."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    stub = types.ModuleType("prompt_toolkit")
    shortcuts = types.ModuleType("prompt_toolkit.shortcuts")
    shortcuts.checkboxlist_dialog = shortcuts.input_dialog = None  # type: ignore[attr-defined]
    sys.modules.setdefault("prompt_toolkit", stub)
    sys.modules.setdefault("prompt_toolkit.shortcuts", shortcuts)
    sys.path.insert(0, str(repo))
    import spectrum as tool  # the reference checkout's spectrum.py

    minilm = bundled_model_path()
    modifier = tool.ModelModifier(top_percent=50)
    modifier.model = AutoModel.from_pretrained(minilm, torch_dtype=torch.float32)
    modifier.model_name = "minilm"
    here = Path.cwd()
    work = scratch / "tool"
    work.mkdir(exist_ok=True)
    os.chdir(work)
    try:
        t0 = time.perf_counter()
        modifier.assess_layers_snr(modifier.sort_weight_types(modifier.get_weight_types()))
        tool_seconds = time.perf_counter() - t0
        modifier.save_snr_to_json()
        tool_json = json.loads((work / "model_snr_results" / "snr_results_minilm.json").read_text())
        tool_yaml = (work / "snr_results_minilm_unfrozenparameters_50percent.yaml").read_text()
    finally:
        os.chdir(here)
    result = make_plan(
        minilm, PlanOptions(kind="spectrum", out=scratch / "mine.json", force=True), cache=False
    )
    make_plan(minilm, PlanOptions(kind="spectrum", out=scratch / "mine.yaml"), cache=False)
    mine = {row["module"]: row["snr"] for row in result.plan["modules"]}
    rel = max(abs(mine[m] - tool_json[m]["snr"]) / abs(tool_json[m]["snr"]) for m in mine)
    groups: dict[str, list[str]] = {}
    current = None
    for line in tool_yaml.splitlines():
        if line.startswith("# "):
            current = line[2 : -len(" layers")]
            groups[current] = []
        elif line.startswith("- ") and current is not None:
            groups[current].append(line[2:])
    ours = {t["type"]: t["chosen"] for t in result.plan["types"]}
    same = all(groups.get(t) == chosen for t, chosen in ours.items())
    kept = [
        line
        for t, chosen in groups.items()
        if t in ours
        for line in (f"# {t} layers", *(f"- {m}" for m in chosen))
    ]
    ours_yaml = (scratch / "mine.yaml").read_text().split("\n# spectra plan")[0].splitlines()
    yaml_equal = tool_yaml.splitlines()[:3] + kept == ours_yaml
    return {
        "modules compared": len(mine),
        "max relative SNR difference": rel,
        "types compared": len(ours),
        "same modules chosen per type (and same order)": same,
        "YAML text equal (tool-only groups dropped first, if any)": yaml_equal,
        "tool-only types (1-D weights)": sorted(set(groups) - set(ours)),
        "tool scan seconds": round(tool_seconds, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "spectra-bench-plan")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spectrum-repo", type=Path, default=None)
    ap.add_argument("--reference-only", action="store_true", help="skip the timing table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    name = f"llama-{args.hidden}-{args.inter}-{args.layers}-{args.vocab}"
    ckpt = args.dir / name
    if not args.reference_only:
        write_checkpoint(ckpt, args.hidden, args.inter, args.layers, args.vocab)
    params = args.layers * (4 * args.hidden**2 + 3 * args.hidden * args.inter)
    params += 2 * args.vocab * args.hidden
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        if not args.reference_only:
            print(f"checkpoint {name}: {params / 1e9:.2f}e9 parameters, {args.threads} threads")
            print(f"{'step':<38} {'seconds':>9}")
            for label, seconds in bench(ckpt, scratch):
                print(f"{label:<38} {seconds:>9.2f}")
        if args.spectrum_repo is not None:
            print("\ncognitivecomputations/spectrum on the bundled MiniLM:")
            for key, value in compare_with_spectrum_tool(args.spectrum_repo, scratch).items():
                print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
