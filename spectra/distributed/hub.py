"""Opening a checkpoint under torchrun: Hub shards downloaded once per node, not once per rank.

Local paths open directly on every rank. For a Hub repo id (without a disk budget), local rank 0
of each node opens it first (a snapshot download into the node's Hub cache, or a cache hit),
then every rank learns the resolved commit and the outcome through one status exchange (a
barrier that also carries errors, so a failed download stops every rank with its message instead
of leaving them waiting); the other ranks then open `repo@commit` offline from the cache.

With a disk budget each rank streams only the shards it reads (the partition gives each rank a
contiguous run of shards), so there is nothing to share.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from spectra.distributed.failures import DistributedError
from spectra.distributed.gather import all_gather
from spectra.distributed.runtime import Session
from spectra.errors import SpectraError
from spectra.sources.bundled import bundled_model_path
from spectra.sources.checkpoint import Checkpoint, is_hub_source
from spectra.sources.hub_options import HubOptions


def open_checkpoint(
    session: Session, source: str | Path | None, hub: HubOptions | None = None
) -> Checkpoint:
    """`Checkpoint.open(source, ...)` on every rank (with the Hub options `hub`), downloading
    Hub shards once per node.

    `source=None` opens the bundled MiniLM."""
    if source is None:
        source = bundled_model_path()
    hub = hub or HubOptions()
    revision, local_only, disk_budget = hub.revision, hub.local_only, hub.disk_budget

    def open_here() -> Checkpoint:
        return Checkpoint.open(
            source, revision=revision, local_only=local_only, disk_budget=disk_budget
        )

    if not (session.env.is_distributed and disk_budget is None and is_hub_source(source)):
        return open_here()
    ckpt = None
    outcome: tuple[str, str] = ("", "")  # (commit, error line) of this rank's leader step
    if session.env.is_local_leader:
        try:
            ckpt = open_here()
            outcome = (snapshot_commit(ckpt.files), "")
        except SpectraError as exc:
            outcome = ("", f"{type(exc).__name__}: {exc}")
    outcomes = all_gather(session, outcome)
    errors = [f"rank {r}: {err}" for r, (_, err) in enumerate(outcomes) if err]
    if errors:
        if ckpt is not None:
            ckpt.close()
        raise DistributedError(f"opening {source} failed on the node leaders: {'; '.join(errors)}")
    if ckpt is not None:
        return ckpt
    leader = session.env.rank - session.env.local_rank  # torchrun numbers ranks node by node
    commit = outcomes[leader][0] or revision
    repo = str(source).partition("@")[0]
    return Checkpoint.open(repo, revision=commit, local_only=True)


def snapshot_commit(files: Sequence[Path]) -> str:
    """The 40-hex commit folder (`.../snapshots/<commit>/...`) a checkpoint's shard `files` were
    opened from ('' when they were not opened from a Hub snapshot)."""
    if not files:
        return ""
    for folder in Path(files[0]).parents:
        name = folder.name
        if folder.parent.name == "snapshots":
            ok = len(name) == 40 and all(c in "0123456789abcdef" for c in name)
            return name if ok else ""
    return ""
