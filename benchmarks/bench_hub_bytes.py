"""Bytes a Hub source moves over the network, measured against the loopback Hub server of the
tests (tests/_hub_server.py) with the real huggingface_hub client.

    .venv/bin/python benchmarks/bench_hub_bytes.py [--layers 8] [--hidden 512] [--shards 8]

Generates a Llama-shaped bf16 checkpoint, serves it as `org/bench`, and prints a table: the
model's size, the bytes served for a streamed full-spectrum pass under a disk budget of two
shards (`Checkpoint.open(..., disk_budget=)` + `compute_spectra`: the API main and this branch
share, so the script runs unchanged on either; put the checkout to measure first on PYTHONPATH),
and for reading the headers (`inspect`). Not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _hub_server import HubServer, Repo  # noqa: E402
from _source_fixtures import write_llama_like  # noqa: E402
from huggingface_hub import constants as hf_constants  # noqa: E402


def point_at(server: HubServer, cache: Path) -> None:
    hf_constants.ENDPOINT = server.url
    hf_constants.HUGGINGFACE_CO_URL_TEMPLATE = (
        server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    hf_constants.HF_HUB_CACHE = str(cache)
    os.environ["HF_HUB_CACHE"] = str(cache)


def served(server: HubServer, mark: int) -> tuple[int, int, int]:
    """(whole-file bytes, ranged bytes, requests) of safetensors bodies since `mark`."""
    rows = [r for r in server.served[mark:] if r[0].endswith(".safetensors")]
    whole = sum(b for _, rng, b in rows if rng is None)
    ranged = sum(b for _, rng, b in rows if rng is not None)
    return whole, ranged, len(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--shards", type=int, default=8)
    args = ap.parse_args()
    import spectra
    from spectra.linalg.engine import EngineOptions, compute_spectra
    from spectra.sources.checkpoint import Checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_llama_like(
            Path(tmp) / "model",
            layers=args.layers,
            hidden=args.hidden,
            intermediate=args.hidden * 2,
            vocab=1000,
            shards=args.shards,
        )
        sizes = [p.stat().st_size for p in folder.glob("*.safetensors")]
        total, budget = sum(sizes), 2 * max(sizes)
        with HubServer({"org/bench": Repo(folder)}) as server:
            point_at(server, Path(tmp) / "hf")
            rows = []
            mark, t0 = len(server.served), time.perf_counter()
            with Checkpoint.open("org/bench", disk_budget=budget) as ckpt:
                opened, t_open = served(server, mark), time.perf_counter() - t0
                mark, t0 = len(server.served), time.perf_counter()
                n = sum(1 for _ in compute_spectra(ckpt, engine=EngineOptions(device="cpu")))
            streamed = served(server, mark)
            rows.append(("open (headers)", opened, t_open))
            rows.append((f"streamed pass, {n} matrices", streamed, time.perf_counter() - t0))
    print(f"spectra from {Path(spectra.__file__).parent}")
    print(f"model: {len(sizes)} shards, {total:,} bytes; disk budget {budget:,} bytes (2 shards)")
    print("| step | whole-file bytes | ranged bytes | bodies | x model | s |")
    print("|---|---|---|---|---|---|")
    for name, (whole, ranged, count), secs in rows:
        print(f"| {name} | {whole:,} | {ranged:,} | {count} | {whole / total:.2f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
