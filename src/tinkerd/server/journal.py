"""The request journal and snapshots: training runs survive a crash of the server process.

Every ordered training request (one with its model's seq_id, and create_model at seq_id 0) is
stored with its future as an entry the server can run again: its kind, its JSON arguments and, for
forward passes, the call as protobuf (`entry`). Every `snapshot_every_steps` optim_steps a run's
exact state (weights, AdamW moments, step count) is written to DATA_DIR/snapshots/<run>/<seq_id>/
and the journal up to that seq_id is dropped (the results stay).

After a crash (kill -9, an OOM kill, power loss) the next process `recover`s every run of a session
that is not finished: it loads the run's newest snapshot, or recreates the run from its journaled
create_model / load_weights before its first, and hands the rest of the journal to the scheduler in
seq_id order. Requests that were in flight get their results, so an SDK polling them carries on;
finished (or failed) requests run again only if they may have changed the run (forward passes and
saves are skipped). The run then equals the one the crash interrupted, bitwise when its forward passes
are batched as they were (one tenant's requests one at a time, the same threads). A run whose
journal has a hole (a request kept without its payload, e.g. from an SDK that sends no seq_id) is
not recovered: its in-flight requests fail with a `server` error that says why, never a silent
rollback. Sample requests of a run's sampler snapshots wait until its replay is done. A run parked
by a server that kept no journal gets a snapshot when it is restored (`lifecycle`): the journal's base.

The same replay `rebuild`s a run whose engine worker died while the server lives on (a Ray actor
killed or lost with its node): the scheduler hands over the failed job's run instead of failing its
future, and sample requests of the run answer 410 so the SDK sends them again.

Knows the Store, the scheduler and the run bookkeeping; not the wire format, not torch. The routes
register how each kind of request becomes a scheduler job (`replayable`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tinkerd.engine.interface import snapshot_run
from tinkerd.protocol.types import ForwardBackwardCall
from tinkerd.server.scheduler import Job, Outcome
from tinkerd.server.state import ServerState

log = logging.getLogger(__name__)

LATEST = "LATEST"  # in a run's snapshot folder: {"seq_id": N}, the newest complete snapshot


@dataclass
class Op:
    """One journaled request, as the route received it (or as the journal gave it back)."""

    st: ServerState
    owner: str
    model_id: str
    seq_id: int | None
    args: dict[str, Any]
    body: bytes = b""
    call: ForwardBackwardCall | None = None  # a forward pass the route already decoded (else: from `body`)


@dataclass
class Replayable:
    build: Callable[[Op], dict]  # the Job's fields: run=..., or call=... and encode=...
    changes_state: Callable[[dict], bool]  # whether a finished request must run again to rebuild the run


_KINDS: dict[str, Replayable] = {}


def replayable(kind: str, changes_state: bool | Callable[[dict], bool] = True):
    """Registers how a journaled request of `kind` becomes a scheduler job (a route module decorates its builder)."""
    def register(build: Callable[[Op], dict]) -> Callable[[Op], dict]:
        _KINDS[kind] = Replayable(build, changes_state if callable(changes_state) else (lambda args: changes_state))
        return build
    return register


def enabled(st: ServerState) -> bool:
    return st.config.snapshot_every_steps > 0


def journaling(st: ServerState, model_id: str) -> bool:
    """Whether this server journals the run (it keeps a journal, and the run never lost its place in it)."""
    return enabled(st) and model_id not in st.runs.unjournaled


def entry(st: ServerState, model_id: str, args: dict, body: bytes = b"") -> bytes | None:
    """What the Store keeps with a request's future to run it again; None when this server keeps no journal."""
    if not journaling(st, model_id):
        return None
    return json.dumps(args).encode() + b"\n" + body


def unpack(blob: bytes) -> tuple[dict, bytes]:
    header, _, body = bytes(blob).partition(b"\n")
    return json.loads(header), body


def job_for(kind: str, op: Op, future_id: str | None) -> Job:
    """The scheduler job for a request; raises BadRequest (before anything is stored) for bad input."""
    job = Job(future_id, kind, **_KINDS[kind].build(op))
    job.model_id, job.seq_id = op.model_id, op.seq_id
    return job


# snapshots

def snapshot_root(st: ServerState, model_id: str) -> Path:
    return st.config.data_dir / "snapshots" / model_id.replace(":", "_")


def latest_snapshot(st: ServerState, model_id: str) -> tuple[int, Path] | None:
    root = snapshot_root(st, model_id)
    try:
        seq_id = int(json.loads((root / LATEST).read_text())["seq_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    folder = root / str(seq_id)
    return (seq_id, folder) if folder.is_dir() else None


def after_optim_step(st: ServerState, model_id: str, seq_id: int | None) -> None:
    """On the engine thread, right after a run's optim_step: every `snapshot_every_steps`-th writes a snapshot."""
    if not seq_id or not journaling(st, model_id):
        return
    runs = st.runs
    runs.steps_since_snapshot[model_id] = runs.steps_since_snapshot.get(model_id, 0) + 1
    if runs.steps_since_snapshot[model_id] >= st.config.snapshot_every_steps:
        write_snapshot(st, model_id, seq_id)


def write_snapshot(st: ServerState, model_id: str, seq_id: int) -> None:
    """The run's state after request `seq_id`; once it is complete on disk, older snapshots and the journal
    up to `seq_id` go."""
    root = snapshot_root(st, model_id)
    st.trainer.save_state(model_id, root / str(seq_id))
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(json.dumps({"seq_id": seq_id, "model_id": model_id}))
    os.replace(tmp, root / LATEST)
    for old in root.iterdir():
        if old.is_dir() and old.name != str(seq_id):
            shutil.rmtree(old, ignore_errors=True)
    st.store.forget_journal(model_id, seq_id)
    st.runs.steps_since_snapshot[model_id] = 0


def forget(st: ServerState, model_id: str) -> None:
    """The run is gone for good (released) or can no longer be journaled: drop its snapshots and journal."""
    shutil.rmtree(snapshot_root(st, model_id), ignore_errors=True)
    st.store.forget_journal(model_id, 1 << 62)
    st.runs.steps_since_snapshot.pop(model_id, None)


def stop_journaling(st: ServerState, model_id: str) -> None:
    """A request without seq_id (an old SDK) cannot be replayed in order: this run is not recoverable."""
    if model_id not in st.runs.unjournaled:
        st.runs.unjournaled.add(model_id)
        forget(st, model_id)


# recovery

def _candidates(st: ServerState) -> list[str]:
    found = set(st.store.journaled_models())
    root = st.config.data_dir / "snapshots"
    if root.is_dir():
        for marker in root.glob(f"*/{LATEST}"):
            try:
                found.add(json.loads(marker.read_text())["model_id"])
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("ignoring unreadable %s", marker)
    return sorted(found)


def recover(st: ServerState) -> tuple[int, set[str]]:
    """At start, before in-flight requests are failed: replay the journal of every run of an open session
    that this process does not hold yet. Returns how many runs were recovered and the in-flight requests
    the replay answers."""
    recovered, answered = 0, set()
    for model_id in _candidates(st):
        if model_id in st.scheduler.models:  # adopted from the folder a graceful stop parked it in
            continue
        if _recover_run(st, model_id, answered):
            recovered += 1
    return recovered, answered


def _recover_run(st: ServerState, model_id: str, answered: set[str]) -> bool:
    snapshot = latest_snapshot(st, model_id)
    after = snapshot[0] if snapshot else -1
    entries = st.store.journal(model_id, after)
    model = st.store.model(model_id)
    first = unpack(entries[0]["request"])[0] if entries and entries[0]["request"] is not None else {}
    session_id = model["session_id"] if model else first.get("session_id")
    session = st.store.session(session_id) if session_id else None
    config = st.config
    kept_for = config.session_timeout_seconds + config.parked_state_ttl_seconds  # what a live server keeps
    if session is None or session["finished"] or (
            config.session_timeout_seconds > 0 and time.time() - session["last_seen"] > kept_for):
        forget(st, model_id)  # a live server would have released it by now
        return False
    hole = _hole(entries, after)
    if hole is not None:
        why = (f"training run {model_id!r} could not be recovered after the server stopped abruptly: {hole}; "
               "its state was not rolled back silently: resume from a checkpoint (save_state)")
        for entry in entries:
            if entry["state"] == "pending":
                st.board.fail(entry["id"], why, "server")
        log.error("%s", why)
        return False

    st.scheduler.open_model(model_id, next_seq=after + 1)
    st.runs.session_of[model_id] = session_id
    st.runs.last_request[model_id] = session["last_seen"]
    st.runs.recovering.setdefault(model_id, [])
    folder = snapshot[1] if snapshot is not None else None
    st.scheduler.submit(Job(None, "recover", lambda: _start_over(st, model_id, folder)))
    replayed, awaited = 0, len(answered)
    for entry in entries:
        pending = entry["state"] == "pending"
        args, body = unpack(entry["request"]) if entry["request"] is not None else (None, b"")
        # a request that failed runs again too: it may have changed the run (a NaN step clears the gradients)
        if args is None or not (pending or _KINDS[entry["kind"]].changes_state(args)):
            job = Job(None, "skip", _nothing)  # holds its seq_id's place, as the request did
        else:
            job = job_for(entry["kind"], Op(st, entry["owner"], model_id, entry["seq_id"] or None, args, body),
                          entry["id"] if pending else None)
            replayed += 1
        if pending:
            st.board.track(entry["id"])
            answered.add(entry["id"])
        if entry["seq_id"] == 0:  # create_model / load_weights creating the run
            st.scheduler.submit(job)
        else:  # in seq_id order; past a gap they wait for it to fill, as they did before the crash
            st.scheduler.submit_ordered(model_id, entry["seq_id"], job)
    st.scheduler.submit(Job(None, "recovered", lambda: _recovered(st, model_id)))
    log.info("recovering training run %s: %s, then %d journaled requests (%d still awaited by clients)", model_id,
             f"snapshot after seq_id {after}" if snapshot else "from its creation", replayed, len(answered) - awaited)
    return True


def _nothing() -> Outcome:
    return Outcome()


MAX_REBUILDS = 3  # per run and process: an engine that keeps dying on a run's replay fails it instead


def rebuild(st: ServerState, model_id: str) -> bool:
    """The engine lost a live run (a Ray actor died): rebuild it like `recover` does at start. Its queued
    and waiting jobs are dropped, because the journal hands them over again. False (the job then fails with
    the engine's error) without a journal, after MAX_REBUILDS, or when the journal cannot rebuild it."""
    if not journaling(st, model_id) or model_id not in st.scheduler.models:
        return False
    st.runs.rebuilds[model_id] = st.runs.rebuilds.get(model_id, 0) + 1
    if st.runs.rebuilds[model_id] > MAX_REBUILDS:
        log.error("training run %s was lost %d times; not rebuilding it again", model_id, MAX_REBUILDS)
        return False
    st.scheduler.close_model(model_id)
    st.scheduler.drop_jobs(model_id)
    log.warning("the engine lost training run %s; rebuilding it from its snapshot and journal", model_id)
    return _recover_run(st, model_id, set())


def _hole(entries: list[dict], after: int) -> str | None:
    if after < 0 and (not entries or entries[0]["seq_id"] != 0):
        return "it has no snapshot and its creating request is not in the journal"
    for entry in entries:
        if entry["state"] != "error" and (entry["request"] is None or entry["kind"] not in _KINDS):
            return f"request seq_id {entry['seq_id']} ({entry['kind']}) is not in the journal"
    return None


def _start_over(st: ServerState, model_id: str, snapshot: Path | None) -> Outcome:
    """Whatever the engine still holds of the run goes (a Ray actor outlives the front end; its seq_id fence
    goes with it); then the snapshot, if any, is the run's state."""
    st.trainer.drop_adapter(model_id)
    if snapshot is not None:
        st.trainer.load_state(model_id, None, snapshot, with_optimizer=True)
    return Outcome()


def _recovered(st: ServerState, model_id: str) -> Outcome:
    """The last replay job: sample requests that waited for the run's sampler snapshots go now (on the loop)."""
    loop = st.board.loop
    waiting = st.runs.recovering.get(model_id, [])

    def release_samples() -> None:
        for submit in st.runs.recovering.pop(model_id, []):
            submit(True)
    if loop is not None:
        loop.call_soon_threadsafe(release_samples)
    log.info("recovered training run %s (%d sample requests waited for it)", model_id, len(waiting))
    return Outcome()


def when_recovered(st: ServerState, adapter_uri: str | None, submit: Callable[[bool], None]) -> None:
    """`submit(False)` now, or `submit(True)` once the replay of the run whose sampler snapshot `adapter_uri`
    names is done (a published snapshot is rebuilt under a new name: look it up again)."""
    model_id = snapshot_run(adapter_uri, st.config.published_adapters)
    if model_id is not None and model_id in st.runs.recovering:
        st.runs.recovering[model_id].append(submit)
    else:
        submit(False)
