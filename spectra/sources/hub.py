"""Hub repo ids (placeholder; filled in below)."""

from __future__ import annotations

import re

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")


def looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.fullmatch(text)) and not text.endswith(".safetensors")


def open_repo(text, *, revision=None, local_only=None, disk_budget=None):  # noqa: ANN001, ANN201
    from spectra.errors import HubError

    raise HubError(f"{text}: Hub repos are not supported yet (no such local path either)")
