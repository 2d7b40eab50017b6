"""Memory is bounded by the batch, not the model: stream a ~130 MB sharded checkpoint in a fresh
process and bound its peak RSS growth (VmHWM, Linux)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _source_fixtures import write_sharded

CHILD = r"""
import json, sys
from pathlib import Path

def vm(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

import torch
from spectra.sources.checkpoint import Checkpoint
ckpt = Checkpoint.open(sys.argv[1])
mats = ckpt.matrices()
before = vm("VmRSS")
total = 0.0
for m, w in ckpt.read_many(mats):
    total += float(w.sum())
    del w
print(json.dumps({"before": before, "peak": vm("VmHWM"), "n": len(mats), "total": total}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_streaming_peak_rss_is_bounded_by_one_tensor(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"model.layers.{i}.mlp.up_proj.weight": torch.randn(2048, 2048, generator=g).bfloat16()
        for i in range(16)
    }  # 16 x 8 MB bf16 = 134 MB on disk, 268 MB as float32
    folder = write_sharded(tmp_path / "big", tensors, shards=4)
    del tensors
    largest_f32 = 2048 * 2048 * 4
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, check=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["n"] == 16
    growth = r["peak"] - r["before"]
    bound = 2 * largest_f32 + 64 * 2**20  # raw bf16 + float32 copy of one tensor, plus slack
    assert growth < bound, f"peak RSS grew {growth / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"
