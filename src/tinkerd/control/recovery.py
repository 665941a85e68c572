"""Crash recovery: training runs rebuilt from their newest restore point and the request journal.

After a crash (kill -9, an OOM kill, power loss) the next process `recover`s every run of a session
that is not finished: it loads the run's newest restore point (`journal`), or recreates the run from
its journaled create_model / load_weights before its first, and hands the rest of the journal to the
scheduler in seq_id order. Requests that were in flight get their results, so an SDK polling them
carries on; finished (or failed) requests run again only if they may have changed the run (forward
passes and saves are skipped). The run then equals the one the crash interrupted, bitwise when its
forward passes are batched as they were (one tenant's requests one at a time, the same threads). A
run whose journal has a hole (a request kept without its payload, e.g. from an SDK that sends no
seq_id) is not recovered: its in-flight requests fail with a `server` error that says why, never a
silent rollback. Sample requests of a run's sampler snapshots wait until its replay is done. A run
parked by a server that kept no journal gets a restore point when it is restored (`lifecycle`): the
journal's base.

The same replay `rebuild`s a run whose engine worker died while the server lives on (a Ray actor
killed or lost with its node): the scheduler hands over the failed job's run instead of failing its
future, and sample requests of the run answer 410 so the SDK sends them again.

Knows the Store, the scheduler, the journal and every kind of request (`ops`, imported here, so a
replay never depends on which modules happened to be imported first); not the wire format, not torch.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from tinkerd.control import journal, ops
from tinkerd.control.plane import ControlPlane
from tinkerd.control.scheduler import Job, Outcome
from tinkerd.engine.interface import snapshot_run

log = logging.getLogger(__name__)


def _candidates(st: ControlPlane) -> list[str]:
    return sorted(set(st.store.journaled_models()) | journal.restore_point_runs(st))


def recover(st: ControlPlane) -> tuple[int, set[str]]:
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


def _recover_run(st: ControlPlane, model_id: str, answered: set[str]) -> bool:
    restore_point = journal.latest_restore_point(st, model_id)
    after = restore_point[0] if restore_point else -1
    entries = st.store.journal(model_id, after)
    model = st.store.model(model_id)
    first = journal.unpack(entries[0]["request"])[0] if entries and entries[0]["request"] is not None else {}
    session_id = model["session_id"] if model else first.get("session_id")
    session = st.store.session(session_id) if session_id else None
    config = st.config
    kept_for = config.session_timeout_seconds + config.parked_state_ttl_seconds  # what a live server keeps
    if session is None or session["finished"] or (
            config.session_timeout_seconds > 0 and time.time() - session["last_seen"] > kept_for):
        journal.forget(st, model_id)  # a live server would have released it by now
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

    # seq_id 0 (the creation) is replayed unordered, so without a restore point the ordered ones start at 1
    st.scheduler.open_model(model_id, next_seq=max(after, 0) + 1)
    st.runs.session_of[model_id] = session_id
    st.runs.last_request[model_id] = session["last_seen"]
    st.runs.recovering.setdefault(model_id, [])
    folder = restore_point[1] if restore_point is not None else None
    # jobs of this run (not barriers): other runs' requests and replays take turns with this one (`Scheduler`)
    st.scheduler.submit(Job(None, "recover", lambda: _start_over(st, model_id, folder), model_id=model_id))
    replayed, awaited = 0, len(answered)
    for entry in entries:
        pending = entry["state"] == "pending"
        args, body = journal.unpack(entry["request"]) if entry["request"] is not None else (None, b"")
        # a request that failed runs again too: it may have changed the run (a NaN step clears the gradients)
        if args is None or not (pending or ops.KINDS[entry["kind"]].changes_state(args)):
            job = Job(None, "skip", ops.hold_place)  # holds its seq_id's place, as the request did
        else:
            op = ops.Op(st, entry["owner"], model_id, entry["seq_id"] or None, args, body)
            job = ops.job_for(entry["kind"], op, entry["id"] if pending else None)
            replayed += 1
        if pending:
            st.board.track(entry["id"])
            answered.add(entry["id"])
        if entry["seq_id"] == 0:  # create_model / load_weights creating the run
            st.scheduler.submit(job)
        else:  # in seq_id order; past a gap they wait for it to fill, as they did before the crash
            st.scheduler.submit_ordered(model_id, entry["seq_id"], job)
    st.scheduler.submit(Job(None, "recovered", lambda: _recovered(st, model_id), model_id=model_id))
    log.info("recovering training run %s: %s, then %d journaled requests (%d still awaited by clients)", model_id,
             f"restore point after seq_id {after}" if restore_point else "from its creation", replayed,
             len(answered) - awaited)
    return True


MAX_REBUILDS = 3  # per run and process: an engine that keeps dying on a run's replay fails it instead


def rebuild(st: ControlPlane, model_id: str) -> bool:
    """The engine lost a live run (a Ray actor died): rebuild it like `recover` does at start. Its queued
    and waiting jobs are dropped, because the journal hands them over again. False (the job then fails with
    the engine's error) without a journal, after MAX_REBUILDS, or when the journal cannot rebuild it."""
    if not journal.journaling(st, model_id) or model_id not in st.scheduler.models:
        return False
    st.runs.rebuilds[model_id] = st.runs.rebuilds.get(model_id, 0) + 1
    if st.runs.rebuilds[model_id] > MAX_REBUILDS:
        log.error("training run %s was lost %d times; not rebuilding it again", model_id, MAX_REBUILDS)
        return False
    st.scheduler.close_model(model_id)
    st.scheduler.drop_jobs(model_id)
    log.warning("the engine lost training run %s; rebuilding it from its restore point and journal", model_id)
    return _recover_run(st, model_id, set())


def _hole(entries: list[dict], after: int) -> str | None:
    if after < 0 and (not entries or entries[0]["seq_id"] != 0):
        return "it has no restore point and its creating request is not in the journal"
    for entry in entries:
        if entry["state"] != "error" and (entry["request"] is None or entry["kind"] not in ops.KINDS):
            return f"request seq_id {entry['seq_id']} ({entry['kind']}) is not in the journal"
    return None


def _start_over(st: ControlPlane, model_id: str, restore_point: Path | None) -> Outcome:
    """Whatever the engine still holds of the run goes (a Ray actor outlives the front end; its seq_id fence
    goes with it); then the restore point, if any, is the run's state."""
    st.trainer.drop_adapter(model_id)
    if restore_point is not None:
        st.trainer.load_state(model_id, None, restore_point, with_optimizer=True)
    return Outcome()


def _recovered(st: ControlPlane, model_id: str) -> Outcome:
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


def when_recovered(st: ControlPlane, adapter_uri: str | None, submit: Callable[[bool], None]) -> None:
    """`submit(False)` now, or `submit(True)` once the replay of the run whose sampler snapshot `adapter_uri`
    names is done (a snapshot written as a version folder is rebuilt under a new name: look it up again)."""
    model_id = snapshot_run(adapter_uri, st.paths.versions)
    if model_id is not None and model_id in st.runs.recovering:
        st.runs.recovering[model_id].append(submit)
    else:
        submit(False)
