"""Who may read a checkpoint, and removing checkpoints (on request or when their TTL passes).

A caller reads a checkpoint its API key created, or any published one, unless it has expired.
Knows the Store rows and the directories they name, not how checkpoints are written or loaded.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tinkerd.server.state import NotFound, ServerState


def is_expired(row: dict, now: float | None = None) -> bool:
    return row.get("expires_at") is not None and row["expires_at"] <= (time.time() if now is None else now)


def readable_checkpoint(st: ServerState, owner: str, tinker_path: str) -> dict:
    """The checkpoint row if `owner` created it or it is published, and it has not expired; else NotFound."""
    row = st.store.checkpoint(tinker_path)
    if row is None or is_expired(row) or (row["owner"] != owner and not row["public"]):
        raise NotFound(f"checkpoint {tinker_path!r} not found")
    return row


def remove_checkpoint(st: ServerState, row: dict) -> None:
    """Deletes the row, then its directory (only if that lies inside the data dir)."""
    st.store.delete_checkpoint(row["path"])
    target, root = Path(row["directory"]).resolve(), st.config.data_dir.resolve()
    if target == root or not target.is_relative_to(root):
        return
    if target.is_dir():
        shutil.rmtree(target, ignore_errors=True)
    elif target.exists():
        target.unlink()


def purge_expired(st: ServerState) -> int:
    """Deletes every expired checkpoint (row and directory) and returns how many. Blocking disk I/O:
    from async code, run it in a thread."""
    rows = st.store.expired_checkpoints()
    for row in rows:
        remove_checkpoint(st, row)
    return len(rows)
