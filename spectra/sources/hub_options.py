"""`HubOptions`: how a Hub repo id is opened (revision, disk budget, offline). A module of its
own, free of torch and huggingface_hub, so the CLI builds it without importing either (a
cached `spectra report` rerun imports no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from spectra.errors import ValidationError
from spectra.fields import check_fields


@dataclass(frozen=True)
class HubOptions:
    """How a Hub repo id is opened (`Checkpoint.open`); ignored for local paths, except that a
    revision given for one is refused.

    revision: branch, tag or commit (None: `org/name@rev` in the source, else main).
    disk_budget: bytes of shards on disk at once: stream shard by shard, downloading each once
        and deleting it after (None: download the safetensors and JSON files into the cache).
    local_only: never touch the network, use the Hub cache (None: the HF_HUB_OFFLINE setting).
    """

    revision: str | None = None
    disk_budget: int | None = None
    local_only: bool | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        if self.revision is not None and not self.revision.strip():
            raise ValidationError("revision must not be empty: give a branch, tag or commit")
        if self.disk_budget is not None and self.disk_budget <= 0:
            raise ValidationError(
                f"disk_budget must be a positive number of bytes, got {self.disk_budget}"
            )
