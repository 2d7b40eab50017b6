"""The Hub cache folder is huggingface_hub's, whichever variable sets it (issue 13 bug).

huggingface_hub resolves its cache once, at import, from HF_HUB_CACHE, else HF_HOME, else
XDG_CACHE_HOME, else ~/.cache. spectra once re-derived that by hand and missed XDG_CACHE_HOME, so
it looked in ~/.cache/huggingface/hub while huggingface_hub had downloaded into
$XDG_CACHE_HOME/huggingface/hub. Each case runs in a fresh process, so huggingface_hub imports
under exactly that environment, and checks that spectra's folder, huggingface_hub's folder and the
folder the documented rule names are one, and that both find the same cached file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _source_fixtures import write_llama_like

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CACHE_VARS = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")

PROBE = f"""
import json
from huggingface_hub import constants, try_to_load_from_cache
from spectra.sources.checkpoint import Checkpoint
from spectra.sources.hub import cached_snapshot, hub_cache_dir

hf_file = try_to_load_from_cache("org/tiny", "config.json", revision={COMMIT!r})
with Checkpoint.open("org/tiny", local_only=True) as ckpt:
    files = [str(p) for p in ckpt.files]
print(json.dumps({{
    "spectra": str(hub_cache_dir()),
    "hub": constants.HF_HUB_CACHE,
    "hub_file": hf_file if isinstance(hf_file, str) else None,
    "snapshot": str(cached_snapshot("org/tiny", None)),
    "files": files,
}}))
"""


def fake_cached_repo(cache: Path, source: Path) -> Path:
    """`org/tiny` laid out in `cache` as huggingface_hub stores it (refs/main -> snapshot)."""
    repo = cache / "models--org--tiny"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for f in sorted(source.iterdir()):
        (snap / f.name).write_bytes(f.read_bytes())
    (snap / "config.json").write_text(json.dumps({"hidden_size": 64}))
    return snap


CASES = {
    # name: (variables set, relative to tmp_path; where the cache must be)
    "HF_HUB_CACHE": ({"HF_HUB_CACHE": "hubcache"}, "hubcache"),
    "HF_HOME": ({"HF_HOME": "hfhome"}, "hfhome/hub"),
    "XDG_CACHE_HOME": ({"XDG_CACHE_HOME": "xdg"}, "xdg/huggingface/hub"),
    "HF_HOME over XDG_CACHE_HOME": (
        {"HF_HOME": "hfhome", "XDG_CACHE_HOME": "xdg"},
        "hfhome/hub",
    ),
    "HF_HUB_CACHE over both": (
        {"HF_HUB_CACHE": "hubcache", "HF_HOME": "hfhome", "XDG_CACHE_HOME": "xdg"},
        "hubcache",
    ),
    "none: ~/.cache": ({}, "home/.cache/huggingface/hub"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_spectra_finds_the_cache_huggingface_hub_uses(tmp_path: Path, case: str) -> None:
    variables, expected_rel = CASES[case]
    expected = tmp_path / expected_rel
    snap = fake_cached_repo(expected, write_llama_like(tmp_path / "src", shards=1))
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARS}
    env.update({k: str(tmp_path / v) for k, v in variables.items()})
    env.update(HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["spectra"] == found["hub"] == str(expected)
    assert found["hub_file"] == str(snap / "config.json")  # huggingface_hub finds the file ...
    assert found["snapshot"] == str(snap)  # ... in the snapshot spectra resolves
    assert [Path(p).parent for p in found["files"]] == [snap]  # and spectra opens offline
