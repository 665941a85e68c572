"""Checkpoint rules: names, kinds, TTLs, who may read one, copying, and removing (on request or at expiry).

A checkpoint is a Store row plus its folder (`datadir`). A caller reads a checkpoint its API key
created, or any published one, unless it has expired; only the owner deletes, publishes or sets a
TTL (the routes check that). Knows the Store rows and the folders they name, not how checkpoints
are written or loaded (the trainer) and not HTTP.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

from tinkerd.control.plane import ControlPlane, NotFound
from tinkerd.engine.interface import AdapterRef
from tinkerd.protocol.paths import parse_tinker_path, run_id, tinker_path
from tinkerd.protocol.types import BadRequest

KINDS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}  # -> the SDK's type
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_TTL_SECONDS = 10 * 366 * 86400


def checkpoint_name(path: str | None) -> str:
    """A client's checkpoint name (`path` of save requests), or a timestamped one; BadRequest if malformed."""
    name = path or time.strftime("ckpt-%Y%m%d-%H%M%S")
    if not NAME.match(name):
        raise BadRequest(f"path: {name!r} is not a valid checkpoint name (letters, digits, '.', '_', '-')")
    return name


def check_ttl(ttl_seconds: int | None) -> None:
    if ttl_seconds is not None and not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
        raise BadRequest(f"ttl_seconds must be in [1, {MAX_TTL_SECONDS}] or null, got {ttl_seconds}")


def checkpoint_path(model_id: str, kind: str, name: str) -> str:
    """The tinker:// path of a REST `checkpoint_id` (`<kind>/<name>`); BadRequest for an unknown kind."""
    if kind not in KINDS:
        raise BadRequest(f"checkpoint_id: expected '<{'|'.join(KINDS)}>/<name>', got {kind + '/' + name!r}")
    return tinker_path(model_id, kind, name)


def is_expired(row: dict, now: float | None = None) -> bool:
    return row.get("expires_at") is not None and row["expires_at"] <= (time.time() if now is None else now)


def readable_checkpoint(st: ControlPlane, owner: str, path: str) -> dict:
    """The checkpoint row if `owner` created it or it is published, and it has not expired; else NotFound."""
    row = st.store.checkpoint(path)
    if row is None or is_expired(row) or (row["owner"] != owner and not row["public"]):
        raise NotFound(f"checkpoint {path!r} not found")
    return row


def sampling_adapter(st: ControlPlane, owner: str, model_path: str, field: str = "model_path") -> AdapterRef:
    """The adapter of a readable checkpoint one can sample: sampler weights, or a training state's weights."""
    _, kind, _ = parse_tinker_path(model_path, field)
    if kind not in ("sampler_weights", "weights"):
        raise BadRequest(f"{field}: cannot sample from a {kind!r} checkpoint")
    checkpoint = readable_checkpoint(st, owner, model_path)
    return AdapterRef(uri=checkpoint["directory"], base_model=checkpoint["base_model"])


def owned_checkpoint(st: ControlPlane, owner: str, path: str) -> dict:
    """The checkpoint row if `owner` created it and it has not expired; else NotFound."""
    row = st.store.checkpoint(path)
    return st.owned(None if row is not None and is_expired(row) else row, owner, "checkpoint", path)


def checkpoint_files(directory: str | Path) -> dict[str, Path]:
    """{posix path relative to the folder: file} for every regular file in a checkpoint folder."""
    root = Path(directory)
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def remove_checkpoint(st: ControlPlane, row: dict) -> None:
    """Deletes the row, then its directory (only if that lies inside the data dir)."""
    st.store.delete_checkpoint(row["path"])
    target, root = Path(row["directory"]).resolve(), st.config.data_dir.resolve()
    if target == root or not target.is_relative_to(root):
        return
    if target.is_dir():
        shutil.rmtree(target, ignore_errors=True)
    elif target.exists():
        target.unlink()


def purge_expired(st: ControlPlane) -> int:
    """Deletes every expired checkpoint (row and directory) and returns how many. Blocking disk I/O:
    from async code, run it in a thread."""
    rows = st.store.expired_checkpoints()
    for row in rows:
        remove_checkpoint(st, row)
    return len(rows)


# copy_weights

def copy_checkpoint(st: ControlPlane, owner: str, source: dict, session_id: str | None, model_seq_id: int | None,
                    ttl_seconds: int | None) -> str:
    """Copy a readable checkpoint (hard links when the file system allows: checkpoint files are never modified
    in place) into a new checkpoint of the caller's with the source's kind; returns its tinker:// path.

    Destination: run `<session_id>:train:<model_seq_id>` when given (a run of the caller's), else the
    source's run with a suffixed name when the caller owns that run, else a new run in a new session of
    the caller's (never another key's run)."""
    model_id = _copy_destination(st, owner, source, session_id, model_seq_id)
    kind = source["kind"]
    name = _free_name(st, model_id, kind, source["name"])
    path, directory = tinker_path(model_id, kind, name), st.paths.checkpoint(model_id, kind, name)
    _link_or_copy_tree(Path(source["directory"]), directory)
    st.store.add_checkpoint(path, model_id, owner, kind, name, str(directory), source["base_model"],
                            user_metadata=source.get("user_metadata"))
    st.store.set_checkpoint_ttl(path, ttl_seconds)
    return path


def _copy_destination(st: ControlPlane, owner: str, source: dict, session_id: str | None,
                      model_seq_id: int | None) -> str:
    if session_id is not None or model_seq_id is not None:
        if session_id is None or model_seq_id is None:
            raise BadRequest("copy_weights: give both session_id and model_seq_id, or neither")
        st.session(session_id, owner)
        model_id = run_id(session_id, model_seq_id)
        st.model(model_id, owner)
        return model_id
    source_model = st.store.model(source["model_id"])
    if source_model is not None and source_model["owner"] == owner:
        return source_model["id"]
    # Another key's (published) checkpoint: a new run of the caller's, which is never trained on.
    new_session = f"s-{uuid.uuid4().hex[:16]}"
    model_id = run_id(new_session, 0)
    st.store.add_session(new_session, owner, None, ["copy_weights"], {})
    lora = (source_model or {}).get("lora_config") or {}
    # The source run's metadata (the cookbook reads `renderer_name` there) is visible to whoever may read
    # the published checkpoint anyway (`access_scope=accessible`).
    metadata = {**((source_model or {}).get("user_metadata") or {}), "copied_from": source["path"]}
    st.store.add_model(model_id, new_session, owner, source["base_model"], lora, metadata)
    return model_id


def _free_name(st: ControlPlane, model_id: str, kind: str, name: str) -> str:
    if st.store.checkpoint(tinker_path(model_id, kind, name)) is None:
        return name
    while True:
        candidate = f"{name[:110]}-copy-{secrets.token_hex(3)}"
        if NAME.match(candidate) and st.store.checkpoint(tinker_path(model_id, kind, candidate)) is None:
            return candidate


def _link_or_copy_tree(source: Path, destination: Path) -> None:
    """Hard-link (or copy, across file systems) a checkpoint folder into place via a temp folder and rename."""
    if not source.is_dir():
        raise NotFound(f"the source checkpoint's files are missing ({source})")

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=destination.parent))
    try:
        shutil.copytree(source, tmp / "copy", copy_function=link, symlinks=False)
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(tmp / "copy", destination)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


COPIES_REMEMBERED = 10_000


class RememberedCopies:
    """The SDK's `X-Idempotency-Key` of copy_weights: a retried copy returns the first copy's path (in memory)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._copies: dict[tuple[str, str], str] = {}

    def copied(self, owner: str, key: str | None) -> str | None:
        with self._lock:
            return self._copies.get((owner, key)) if key else None

    def remember(self, owner: str, key: str | None, path: str) -> None:
        if key:
            with self._lock:
                self._copies[(owner, key)] = path
                while len(self._copies) > COPIES_REMEMBERED:  # dicts keep insertion order: drop the oldest
                    del self._copies[next(iter(self._copies))]
