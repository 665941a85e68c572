"""A server process that dies abruptly loses nothing: the next one rebuilds each training run from its
snapshot and the request journal, and answers the requests that were in flight (tiny model, in-process).

A "crash" here is a TestClient leaving without parking (shutdown_park_seconds 0) while requests are
still queued behind a job that holds the engine thread; the next app gets a fresh trainer on the same
data dir and Store, as a new process would.
"""

import threading
import time

import numpy as np
import pytest

from tinkerd.control.scheduler import Job, Outcome
from tests.app_client import OWNER_KEY as KEY, future_result
from tests.control.test_lifecycle import DATUM, PROMPT, Run, _app

TRAIN = {"forward_backward_input": {"data": [DATUM], "loss_fn": "cross_entropy"}}
ADAM = {"adam_params": {"learning_rate": 0.01}}


def _hold_engine(client) -> threading.Event:
    """Queue a job that blocks the engine thread until the returned event is set."""
    gate = threading.Event()
    client.st.scheduler.submit(Job(None, "hold", lambda: gate.wait(30) and Outcome()))
    return gate


def _post(run, route, body):
    r = run.post(route, body)
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def _sample(client, sampler_id):
    r = client.post("/api/v1/asample", headers=KEY, json={
        "sampling_session_id": sampler_id, "num_samples": 2, "prompt": PROMPT,
        "sampling_params": {"max_tokens": 6, "seed": 11, "stop": []}})
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def _uninterrupted(tmp_path):
    """The reference: the same requests, one process, nothing in the way."""
    with _app(tmp_path / "reference") as client:
        client.st = client.app.state.tinkerd
        run = Run(client)
        losses = [run.train_step() for _ in range(3)]
        sampler = run.sampler(0)
        losses.append(run.call("forward_backward", **TRAIN)["metrics"]["loss:sum"])
        run.call("optim_step", **ADAM)
        tokens = future_result(client, _sample(client, sampler))["sequences"]
        return losses, run.logprobs(), tokens


def test_a_crash_mid_run_loses_nothing_and_in_flight_requests_get_their_results(tmp_path):
    losses, logprobs, tokens = _uninterrupted(tmp_path)
    data = tmp_path / "data"
    with _app(data, restore_point_every_steps=2) as client:  # snapshots after optim_steps 2 (seq_id 4)
        client.st = client.app.state.tinkerd
        run = Run(client)
        before = [run.train_step() for _ in range(3)]  # seq_ids 1..6; 5 and 6 only in the journal
        sampler = run.sampler(0)  # seq_id 7: an in-memory snapshot the replay must rebuild
        gate = _hold_engine(client)
        fb, step = _post(run, "forward_backward", TRAIN), _post(run, "optim_step", ADAM)  # 8, 9: in flight
        lost_sample = _sample(client, sampler)
        snapshots = sorted(p.name for p in (data / "snapshots").iterdir())
    gate.set()  # the dead process's engine thread lets go; its queue is gone with it
    assert before == losses[:3]
    assert len(snapshots) == 1 and (data / "snapshots" / snapshots[0] / "4").is_dir()

    with _app(data, restore_point_every_steps=2) as client:
        client.st = client.app.state.tinkerd
        assert future_result(client, fb)["metrics"]["loss:sum"] == losses[3]
        assert "metrics" in future_result(client, step)
        lost = client.post("/api/v1/retrieve_future", headers=KEY, json={"request_id": lost_sample})
        assert lost.status_code == 410 and "send it again" in lost.json()["detail"]
        assert future_result(client, _sample(client, sampler))["sequences"] == tokens  # the rebuilt snapshot
        run.client = client
        np.testing.assert_array_equal(run.logprobs(), logprobs)  # bitwise: the same run
        assert run.train_step() < losses[3]  # and it goes on (seq_ids continue after the replayed ones)


def test_samples_sent_during_the_replay_wait_for_the_snapshot_they_name(tmp_path):
    data = tmp_path / "data"
    with _app(data, restore_point_every_steps=1) as client:
        client.st = client.app.state.tinkerd
        run = Run(client)
        run.train_step()  # snapshot after seq_id 2
        sampler = run.sampler(0)  # seq_id 3, journal only
        expected = future_result(client, _sample(client, sampler))["sequences"]
    client = _app(data, restore_point_every_steps=1)
    gate, load = threading.Event(), client.trainer.load_state
    client.trainer.load_state = lambda *a, **k: gate.wait(30) and load(*a, **k)  # the replay's first job waits
    with client:
        client.st = client.app.state.tinkerd
        request = _sample(client, sampler)
        assert client.st.scheduler.pending_samples == 0 and len(client.st.runs.recovering[run.model_id]) == 1
        gate.set()
        assert future_result(client, request)["sequences"] == expected
        assert client.st.runs.recovering == {}


def test_a_run_whose_journal_has_a_hole_fails_its_requests_instead_of_rolling_back(tmp_path):
    data = tmp_path / "data"
    with _app(data, restore_point_every_steps=5) as client:
        client.st = client.app.state.tinkerd
        run = Run(client)
        run.train_step()
        gate = _hold_engine(client)
        in_flight = _post(run, "forward_backward", TRAIN)
        client.st.store._execute("UPDATE futures SET request = NULL WHERE model_id = ? AND seq_id = 1",
                                 (run.model_id,))  # as if seq_id 1 had not been journaled
    gate.set()
    with _app(data, restore_point_every_steps=5) as client:
        failed = future_result(client, in_flight)
        assert failed["category"] == "server" and "request seq_id 1 (forward_backward) is not in the journal" in failed["error"]
        run.client = client
        r = run.post("optim_step", ADAM)
        assert r.status_code == 404 and "not loaded" in r.text


def test_without_a_journal_in_flight_requests_fail_clearly(tmp_path):
    data = tmp_path / "data"
    with _app(data) as client:  # restore_point_every_steps 0: no journal
        client.st = client.app.state.tinkerd
        run = Run(client)
        gate = _hold_engine(client)
        in_flight = _post(run, "forward_backward", TRAIN)
        assert client.st.store.future(in_flight)["request"] is None
    gate.set()
    with _app(data) as client:
        failed = future_result(client, in_flight)
        assert failed["category"] == "server" and "restarted" in failed["error"]


def test_a_finished_session_leaves_no_snapshot_or_journal_behind(tmp_path):
    data = tmp_path / "data"
    with _app(data, restore_point_every_steps=1) as client:
        client.st = client.app.state.tinkerd
        run = Run(client)
        run.train_step()
        run.call("forward_backward", **TRAIN)
        assert (data / "snapshots").is_dir() and client.st.store.journaled_models() == [run.model_id]
        run.finish()
        other = Run(client)
        other.train_step()  # queued behind the unload; its snapshot covers its journal
        assert client.st.store.journaled_models() == [] and client.st.store.journal(run.model_id, -1)[0]["request"] is None
        assert [p.name for p in (data / "snapshots").iterdir()] == [other.model_id.replace(":", "_")]


def test_a_run_parked_by_a_server_without_journal_is_recoverable_after_its_restore(tmp_path):
    """The parked state becomes the journal's base when a journaling server restores it (else a crash
    after the restore would find neither a snapshot nor the run's creation in the journal)."""
    losses, logprobs, _ = _uninterrupted(tmp_path)
    data = tmp_path / "data"
    with _app(data, shutdown_park_seconds=30) as client:  # no journal; a graceful stop parks the run
        run = Run(client)
        before = [run.train_step() for _ in range(2)]  # seq_ids 1..4
    with _app(data, restore_point_every_steps=10) as client:  # adopts the parked run; crashes below
        client.st = client.app.state.tinkerd
        run.client = client
        before.append(run.train_step())  # restored (its state becomes the journal's base), seq_ids 5, 6
        gate = _hold_engine(client)
        fb, step = _post(run, "forward_backward", TRAIN), _post(run, "optim_step", ADAM)  # in flight
    gate.set()
    assert before == losses[:3]
    with _app(data, restore_point_every_steps=10) as client:
        client.st = client.app.state.tinkerd
        assert future_result(client, fb)["metrics"]["loss:sum"] == losses[3]
        assert "metrics" in future_result(client, step)
        run.client = client
        np.testing.assert_array_equal(run.logprobs(), logprobs)


def test_after_a_crash_a_short_replay_is_answered_while_a_long_one_still_runs(tmp_path):
    """Issue 24 defect 7: one run's long replay does not hold up another run's requests. The long run replays
    10 steps, each made slow here; the short run's next request is answered while the long one still replays."""
    data = tmp_path / "data"
    config = {"restore_point_every_steps": 1000}  # a journal, no restore point: each run replays from its creation
    with _app(data, **config) as client:
        long_run, short_run = Run(client, seed=1), Run(client, seed=2)
        for _ in range(10):
            long_run.train_step()
        short_run.train_step()

    client = _app(data, **config)
    step = client.trainer.optim_step

    def slow_for_the_long_run(model_id, params):
        if model_id == long_run.model_id:
            time.sleep(0.3)
        return step(model_id, params)

    client.trainer.optim_step = slow_for_the_long_run
    with client:
        st = client.app.state.tinkerd
        started = time.monotonic()
        short_run.client = client
        fb = _post(short_run, "forward_backward", TRAIN)
        assert "metrics" in future_result(client, fb)
        answered = time.monotonic() - started
        assert long_run.model_id in st.runs.recovering, "the long replay finished first: nothing was shown"
        long_run.client = client
        assert "metrics" in future_result(client, _post(long_run, "forward_backward", TRAIN))
        print(f"restart to first answer: short run {answered:.2f} s, long run {time.monotonic() - started:.2f} s")
