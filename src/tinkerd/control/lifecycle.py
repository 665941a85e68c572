"""Training runs give their engine memory back when their session ends.

A training run (model_id) holds engine memory (LoRA weights and gradients, AdamW moments, up to 8
sampler snapshots) from create_model / load_weights until its session ends:

- **finished** (`POST /sessions/{id}/finish`, what `ServiceClient.close()` sends): the run is
  *released*. An engine job, queued behind the work already submitted, drops it. Its Store rows
  and checkpoints stay; later training requests on it answer 410 with the newest state checkpoint
  to resume from (the SDK documents that a finished session rejects further operations).
- **lapsed** (no heartbeat and no training request for `session_timeout_seconds`; the SDK
  heartbeats every 10 s): the run is *parked*. An engine job writes its exact state (weights, AdamW
  moments and step count, gradients accumulated since the last optim_step) to
  `DATA_DIR/unloaded/`, then drops it. The next training request on the run first restores that
  state (an engine job queued ahead of it) and deletes the folder, so a client that was suspended
  or offline carries on as if nothing happened. Parked state is kept `parked_state_ttl_seconds`
  after the session's last sign of life; then it is deleted and the run released.

- **server stopping** (SIGTERM, Ctrl-C): every loaded run is parked the same way, after the work
  already queued, and a parked run's folder says which run and session it belongs to and the next
  seq_id. The next process adopts those folders at start, so a restart (an upgrade, a reboot) loses
  no training state: each run is restored on its next request, exactly. A process that is killed
  outright (kill -9, power loss) parks nothing; with `restore_point_every_steps` set, the next process
  rebuilds its runs from their restore points and the request journal (`recovery`), else they answer 404
  with how to resume from a checkpoint.

In-memory sampler snapshots go with their run (a running sample keeps its snapshot until it
finishes); sampling from them afterwards answers 410. Engine memory is only touched by scheduler
jobs on the engine thread; the bookkeeping here (`ControlPlane.runs`) lives on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from pathlib import Path

from tinkerd.control import journal
from tinkerd.control.plane import ControlPlane, Gone
from tinkerd.control.scheduler import Job, Outcome
from tinkerd.engine.interface import memory_key, snapshot_run
from tinkerd.protocol.paths import session_of_run

log = logging.getLogger(__name__)

FINISHED, LAPSED, EXPIRED = "finished", "lapsed", "expired"
ORPHAN_MIN_AGE_SECONDS = 3600.0


def open_run(st: ControlPlane, model_id: str, session_id: str) -> None:
    """A run of `session_id` is being created (create_model, load_weights into a new model)."""
    st.scheduler.open_model(model_id)
    st.runs.session_of[model_id] = session_id
    st.runs.last_request[model_id] = time.time()
    st.runs.released.pop(model_id, None)


def check_session_open(session: dict) -> None:
    """New runs only in sessions that are not finished (410)."""
    if session["finished"]:
        raise Gone(f"session {session['id']!r} is finished; create a new ServiceClient to start new runs")


def before_training_request(st: ControlPlane, model_id: str) -> None:
    """Called before queueing a training operation: 410 for a released run; a parked run is restored first."""
    runs = st.runs
    if model_id in runs.released:
        raise Gone(released_message(st, model_id))
    runs.last_request[model_id] = time.time()
    if model_id in runs.parked:
        _restore(st, model_id)


def check_snapshot(st: ControlPlane, adapter_uri: str | None) -> None:
    """410 when a sampler snapshot (`mem://`, or a version folder written for vLLM under DATA_DIR/adapters/<run>/)
    belonged to a run that was unloaded."""
    model_id = snapshot_run(adapter_uri, st.paths.versions)
    if model_id is None:
        return
    key = memory_key(adapter_uri) or f"{model_id}@{Path(adapter_uri).name}"
    if model_id in st.runs.parked:
        raise Gone(f"sampler weights {key!r} were dropped from memory when training run {model_id!r} was unloaded "
                   f"(its session sent no heartbeat for {st.config.session_timeout_seconds:g} s); call "
                   "save_weights_and_get_sampling_client again (the training run resumes where it was)")
    if model_id in st.runs.released:
        raise Gone(f"sampler weights {key!r} were dropped from memory: {released_message(st, model_id)}")


def released_message(st: ControlPlane, model_id: str) -> str:
    reason = st.runs.released[model_id]
    session = session_of_run(model_id)
    timeout, ttl = st.config.session_timeout_seconds, st.config.parked_state_ttl_seconds
    why = {
        FINISHED: f"its session {session!r} finished (ServiceClient.close, or the end of its `with` block)",
        LAPSED: f"its session {session!r} sent no heartbeat for {timeout:g} s",
        EXPIRED: f"its session {session!r} sent no heartbeat for {timeout:g} s and its unsaved state was kept "
                 f"for {ttl:g} s",
    }[reason]
    newest = next((c for c in st.store.model_checkpoints(model_id) if c["kind"] == "weights"), None)
    if newest is None:
        resume = "it has no save_state checkpoint to resume from"
    else:
        resume = (f"to continue training it, call ServiceClient().create_training_client_from_state_with_optimizer"
                  f"({newest['path']!r}) (its newest save_state checkpoint)")
    return f"training run {model_id!r} was unloaded from memory because {why}; {resume}"


# unloading and restoring (engine work as scheduler jobs, in order with the run's requests)

def release(st: ControlPlane, model_id: str, reason: str) -> None:
    """Unload a run for good: drop it (or its parked state); waiting requests fail with the reason."""
    runs = st.runs
    was_parked = runs.parked.pop(model_id, None) is not None
    runs.session_of.pop(model_id, None)
    runs.last_request.pop(model_id, None)
    runs.released[model_id] = reason
    model = st.store.model(model_id)
    if model is not None:
        st.admission.run_released(model["owner"], model_id)
    waiting = st.scheduler.close_model(model_id)
    if waiting:
        message = released_message(st, model_id)
        for job in waiting:
            st.board.fail(job.future_id, message, "user")
    directory = st.paths.parked(model_id)

    def run() -> Outcome:
        if was_parked:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            st.trainer.drop_adapter(model_id)
        journal.forget(st, model_id)
        log.info("unloaded training run %s (%s)", model_id, reason)
        return Outcome()

    st.scheduler.submit(Job(None, "unload", run))


def release_session(st: ControlPlane, session_id: str, reason: str = FINISHED) -> None:
    for model_id, owner_session in list(st.runs.session_of.items()):
        if owner_session == session_id:
            release(st, model_id, reason)


RUN_FILE = "run.json"  # in a parked run's folder: which run, whose session, its next seq_id


def park(st: ControlPlane, model_id: str, why: str = "session lapsed") -> None:
    """Unload a run, keeping its exact state on disk for a transparent restore (also by a later process)."""
    st.runs.parked[model_id] = time.time()
    directory = st.paths.parked(model_id)
    queue = st.scheduler.models.get(model_id)
    about = {"model_id": model_id, "session_id": st.runs.session_of.get(model_id),
             "next_seq": queue.next_seq if queue is not None else 1}

    def run() -> Outcome:
        st.trainer.save_state(model_id, directory, with_gradients=True)  # BadRequest if it was never created
        (directory / RUN_FILE).write_text(json.dumps(about))
        st.trainer.drop_adapter(model_id)  # only once its state is safely on disk
        log.info("unloaded training run %s (%s); state kept in %s", model_id, why, directory)
        return Outcome()

    st.scheduler.submit(Job(None, "park", run))


async def park_all(st: ControlPlane, timeout_seconds: float) -> int:
    """At shutdown: park every loaded run behind the queued work and wait (at most `timeout_seconds`)."""
    loaded = [m for m in st.runs.session_of if m not in st.runs.parked]
    if not loaded:
        return 0
    for model_id in loaded:
        park(st, model_id, "server stopping")
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    st.scheduler.submit(Job(None, "parked all", lambda: loop.call_soon_threadsafe(done.set) or Outcome()))
    try:
        await asyncio.wait_for(done.wait(), timeout_seconds)
    except asyncio.TimeoutError:
        log.warning("stopping before every training run was parked (%g s); unsaved state of the rest is lost",
                    timeout_seconds)
    return len(loaded)


def adopt_parked(st: ControlPlane) -> int:
    """At start: runs parked by an earlier process (their folders hold RUN_FILE) are parked runs of this one."""
    root = st.paths.parked_root
    adopted = 0
    for marker in sorted(root.glob(f"*/{RUN_FILE}")) if root.is_dir() else []:
        try:
            about = json.loads(marker.read_text())
            model_id, session_id, next_seq = about["model_id"], about["session_id"], int(about["next_seq"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable %s", marker)
            continue
        if st.store.model(model_id) is None or st.paths.parked(model_id) != marker.parent or session_id is None:
            continue
        st.scheduler.open_model(model_id, next_seq=next_seq)
        st.runs.session_of[model_id] = session_id
        st.runs.parked[model_id] = marker.stat().st_mtime
        adopted += 1
    return adopted


def _restore(st: ControlPlane, model_id: str) -> None:
    st.runs.parked.pop(model_id, None)
    directory = st.paths.parked(model_id)
    parked_after = st.scheduler.models[model_id].next_seq - 1  # the last request the parked state includes

    def run() -> Outcome:
        if directory.is_dir():  # else parking failed and the run is still loaded
            st.trainer.load_state(model_id, None, directory, with_optimizer=True)
            if journal.journaling(st, model_id) and journal.latest_restore_point(st, model_id) is None:
                # parked by a server that kept no journal: the journal from here on needs this state as its base
                journal.write_restore_point(st, model_id, parked_after)
            shutil.rmtree(directory, ignore_errors=True)
            if st.store.has_inflight_sessions(model_id):  # its inflight clients follow it: the restored weights
                st.store.repoint_inflight_sessions(model_id, st.trainer.publish_inflight(model_id).uri)
            log.info("restored training run %s", model_id)
        return Outcome()

    st.scheduler.submit(Job(None, "restore", run))


# the sweep

async def sweep(st: ControlPlane, now: float | None = None) -> None:
    """Release runs of finished sessions, park runs of lapsed ones, expire old parked state; cancel
    the sample requests of lapsed sessions (a finished session's running samples still complete)."""
    runs, config = st.runs, st.config
    sampling = st.scheduler.sample_sessions()
    session_ids = set(runs.session_of.values()) | sampling
    rows = await asyncio.to_thread(lambda: {sid: st.store.session(sid) for sid in session_ids})
    now = time.time() if now is None else now
    for session_id in sampling:  # sample requests of a client that is gone free their rows
        row = rows[session_id]
        if row is not None and config.session_timeout_seconds > 0 and now - row["last_seen"] > config.session_timeout_seconds:
            st.scheduler.cancel_session_samples(
                session_id, f"abandoned: session {session_id!r} sent no heartbeat for {config.session_timeout_seconds:g} s")
    for model_id, session_id in list(runs.session_of.items()):
        if session_id not in rows:  # opened while the Store was read
            continue
        row = rows[session_id]
        if row is None or row["finished"]:
            release(st, model_id, FINISHED)
            continue
        alive = max(row["last_seen"], runs.last_request.get(model_id, 0.0))
        if model_id in runs.parked:
            if now - max(alive, runs.parked[model_id]) > config.parked_state_ttl_seconds:
                release(st, model_id, EXPIRED)
        elif config.session_timeout_seconds > 0 and now - alive > config.session_timeout_seconds:
            if config.parked_state_ttl_seconds > 0:
                park(st, model_id)
            else:
                release(st, model_id, LAPSED)
    mine = {st.paths.parked(m).name for m in runs.parked}
    older_than = now - max(config.parked_state_ttl_seconds, ORPHAN_MIN_AGE_SECONDS)
    await asyncio.to_thread(_delete_orphans, st.paths.parked_root, mine, older_than)


def _delete_orphans(root, keep: set[str], older_than: float) -> None:
    """Parked state no parked run refers to (left by an earlier process) goes after the TTL (and at
    least ORPHAN_MIN_AGE_SECONDS, so a folder with a restore still queued is never taken)."""
    if not root.is_dir():
        return
    for folder in root.iterdir():
        try:
            if folder.name not in keep and folder.stat().st_mtime < older_than:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass


def sweep_interval(config) -> float:
    timeout = config.session_timeout_seconds
    return min(30.0, max(0.05, timeout / 4)) if timeout > 0 else 30.0


async def sweep_forever(st: ControlPlane) -> None:
    while True:
        await asyncio.sleep(sweep_interval(st.config))
        try:
            await sweep(st)
        except Exception:  # noqa: BLE001 - a failed sweep (e.g. the Store briefly unreachable) is retried
            log.exception("session sweep failed")
