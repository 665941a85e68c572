"""The request journal and restore points: what a training run needs to survive a crash of the server.

Every ordered training request (one with its model's seq_id, and create_model at seq_id 0) is
stored with its future as an entry the server can run again: its kind (`ops`), its JSON arguments
and, for forward passes, the call as protobuf (`entry`). Every `restore_point_every_steps`
optim_steps a run's exact state (weights, AdamW moments, step count) is written as a *restore point*
to DATA_DIR/snapshots/<run>/<seq_id>/ (`datadir`) and the journal up to that seq_id is dropped (the
results stay). Rebuilding a run from its newest restore point and the journal after it is
`recovery`'s job.

A run that gets a request without seq_id (an SDK that sends none) cannot be replayed in order: it
stops being journaled (`stop_journaling`), and a crash loses it (said clearly, never rolled back).

Knows the Store, the engine's `save_state` and the run bookkeeping; not the wire format, not torch,
not how a kind of request becomes a job.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from tinkerd.control.plane import ControlPlane

log = logging.getLogger(__name__)

LATEST = "LATEST"  # in a run's restore-point folder: {"seq_id": N, "model_id": ...}, the newest complete one


def enabled(st: ControlPlane) -> bool:
    return st.config.restore_point_every_steps > 0


def journaling(st: ControlPlane, model_id: str) -> bool:
    """Whether this server journals the run (it keeps a journal, and the run never lost its place in it)."""
    return enabled(st) and model_id not in st.runs.unjournaled


def entry(st: ControlPlane, model_id: str, args: dict, body: bytes = b"") -> bytes | None:
    """What the Store keeps with a request's future to run it again; None when this server keeps no journal."""
    if not journaling(st, model_id):
        return None
    return json.dumps(args).encode() + b"\n" + body


def unpack(blob: bytes) -> tuple[dict, bytes]:
    header, _, body = bytes(blob).partition(b"\n")
    return json.loads(header), body


def latest_restore_point(st: ControlPlane, model_id: str) -> tuple[int, Path] | None:
    """(seq_id, folder) of the run's newest complete restore point, or None."""
    root = st.paths.restore_points(model_id)
    try:
        seq_id = int(json.loads((root / LATEST).read_text())["seq_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    folder = root / str(seq_id)
    return (seq_id, folder) if folder.is_dir() else None


def restore_point_runs(st: ControlPlane) -> set[str]:
    """The runs that have a restore point on disk (read from their LATEST pointers)."""
    found, root = set(), st.paths.restore_points_root
    for marker in root.glob(f"*/{LATEST}") if root.is_dir() else []:
        try:
            found.add(json.loads(marker.read_text())["model_id"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable %s", marker)
    return found


def after_optim_step(st: ControlPlane, model_id: str, seq_id: int | None) -> None:
    """On the engine thread, right after a run's optim_step: every `restore_point_every_steps`-th writes a
    restore point."""
    if not seq_id or not journaling(st, model_id):
        return
    runs = st.runs
    runs.steps_since_restore_point[model_id] = runs.steps_since_restore_point.get(model_id, 0) + 1
    if runs.steps_since_restore_point[model_id] >= st.config.restore_point_every_steps:
        write_restore_point(st, model_id, seq_id)


def write_restore_point(st: ControlPlane, model_id: str, seq_id: int) -> None:
    """The run's state after request `seq_id`; once it is complete on disk, older restore points and the
    journal up to `seq_id` go."""
    root = st.paths.restore_points(model_id)
    st.trainer.save_state(model_id, root / str(seq_id))
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(json.dumps({"seq_id": seq_id, "model_id": model_id}))
    os.replace(tmp, root / LATEST)
    for old in root.iterdir():
        if old.is_dir() and old.name != str(seq_id):
            shutil.rmtree(old, ignore_errors=True)
    st.store.forget_journal(model_id, seq_id)
    st.runs.steps_since_restore_point[model_id] = 0


def forget(st: ControlPlane, model_id: str) -> None:
    """The run is gone for good (released) or can no longer be journaled: drop its restore points and journal."""
    shutil.rmtree(st.paths.restore_points(model_id), ignore_errors=True)
    st.store.forget_journal(model_id, 1 << 62)
    st.runs.steps_since_restore_point.pop(model_id, None)


def stop_journaling(st: ControlPlane, model_id: str) -> None:
    """A request without seq_id (an old SDK) cannot be replayed in order: this run is not recoverable."""
    if model_id not in st.runs.unjournaled:
        st.runs.unjournaled.add(model_id)
        forget(st, model_id)
