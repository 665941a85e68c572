"""Training runs give their memory back when their session finishes or lapses (tiny model, in-process)."""

import os
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tinkerd.engine.sampler import LocalSampler
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.control import lifecycle
from tinkerd.server.app import create_app
from tinkerd.control.plane import ServerConfig
from tests.conftest import make_tiny_runtime
from tests.app_client import OWNER_KEY as KEY, future_result

DATUM = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [3, 4, 5, 6]}]},
         "loss_fn_inputs": {"target_tokens": {"data": [4, 5, 6, 7], "dtype": "int64", "shape": [4]},
                            "weights": {"data": [1.0, 1.0, 1.0, 1.0], "dtype": "float32", "shape": [4]}}}
PROMPT = {"chunks": [{"type": "encoded_text", "tokens": [3, 4]}]}


class HoldingSampler(LocalSampler):
    """While `hold` is set, stops taking decode steps once a sample is running (the engine thread then
    runs training jobs only), until the test clears `holding`."""

    def __init__(self, runtimes):
        super().__init__(runtimes)
        self.hold, self.holding = threading.Event(), threading.Event()

    def step(self):
        out = super().step()
        if self.hold.is_set() and self.active_rows():
            self.holding.set()
        return out

    def has_work(self):
        return not self.holding.is_set() and super().has_work()


def _app(tmp_path, **config):
    runtime = make_tiny_runtime()
    trainer, sampler = LocalTrainer({"tiny": runtime}), HoldingSampler({"tiny": runtime})
    app = create_app(ServerConfig(data_dir=tmp_path, long_poll_seconds=5, **config), trainer, sampler)
    client = TestClient(app)
    client.runtime, client.trainer, client.sampler = runtime, trainer, sampler
    return client


@pytest.fixture
def api(tmp_path):
    with _app(tmp_path) as client:
        client.st = client.app.state.tinkerd
        yield client


class Run:
    """A session with one training run, driven like the SDK does (seq ids 1, 2, 3...)."""

    def __init__(self, client, seed=1):
        self.client = client
        self.session = client.post("/api/v1/create_session", json={"tags": []}, headers=KEY).json()["session_id"]
        fut = client.post("/api/v1/create_model", headers=KEY, json={
            "session_id": self.session, "model_seq_id": 0, "base_model": "tiny",
            "lora_config": {"rank": 4, "seed": seed}}).json()
        self.model_id = fut["model_id"]
        assert future_result(client, fut["request_id"])["model_id"] == self.model_id
        self.seq = 0

    def post(self, route, body):
        self.seq += 1
        return self.client.post(f"/api/v1/{route}", headers=KEY, json={"model_id": self.model_id, "seq_id": self.seq, **body})

    def call(self, route, **body):
        r = self.post(route, body)
        assert r.status_code == 200, r.text
        result = future_result(self.client, r.json()["request_id"])
        assert "error" not in result, result
        return result

    def train_step(self):
        loss = self.call("forward_backward", forward_backward_input={"data": [DATUM], "loss_fn": "cross_entropy"})
        self.call("optim_step", adam_params={"learning_rate": 0.01})
        return loss["metrics"]["loss:sum"]

    def logprobs(self):
        out = self.call("forward", forward_input={"data": [DATUM], "loss_fn": "cross_entropy"})
        return np.array(out["loss_fn_outputs"][0]["logprobs"]["data"])

    def sampler(self, seq):
        return self.call("save_weights_for_sampler", sampling_session_seq_id=seq)["sampling_session_id"]

    def finish(self):
        assert self.client.post(f"/api/v1/sessions/{self.session}/finish", headers=KEY,
                                json={"reason": {"type": "success"}}).status_code == 200

    def heartbeat(self):
        return self.client.post("/api/v1/session_heartbeat", headers=KEY, json={"session_id": self.session})


def _keys(runtime, model_id):
    return sorted(k for k in runtime.lora.specs if k == model_id or k.startswith(model_id + "@"))


def _sample(client, sampler_id, max_tokens=5):
    return client.post("/api/v1/asample", headers=KEY, json={
        "sampling_session_id": sampler_id, "num_samples": 1, "prompt": PROMPT,
        "sampling_params": {"max_tokens": max_tokens, "seed": 3, "stop": []}})


def _wait(condition, what, seconds=30.0):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_finished_session_unloads_its_runs_and_later_requests_say_how_to_resume(api):
    a, b = Run(api, seed=1), Run(api, seed=2)
    for run in (a, b):
        run.train_step()
    snapshots = [a.sampler(i) for i in range(3)]  # the same version: one snapshot, reused
    a.train_step()
    snapshots.append(a.sampler(3))
    checkpoint = a.call("save_weights", path="ck")["path"]
    assert _keys(api.runtime, a.model_id) == [a.model_id, f"{a.model_id}@1", f"{a.model_id}@2"]
    before = api.runtime.lora.nbytes()
    a_bytes = sum(api.runtime.lora.nbytes(k) for k in _keys(api.runtime, a.model_id))

    a.finish()
    b_loss = b.train_step()  # queued behind the unload: when it is done, so is the unload
    assert _keys(api.runtime, a.model_id) == [] and a.model_id not in api.trainer.adapters
    assert api.runtime.lora.nbytes() == before - a_bytes
    assert _keys(api.runtime, b.model_id) == [b.model_id]
    assert b.train_step() < b_loss  # the other tenant still trains

    r = a.post("forward_backward", {"forward_backward_input": {"data": [DATUM], "loss_fn": "cross_entropy"}})
    assert r.status_code == 410
    detail = r.json()["detail"]
    assert "finished" in detail and f"create_training_client_from_state_with_optimizer({checkpoint!r})" in detail
    assert _sample(api, snapshots[-1]).status_code == 410
    r = api.post("/api/v1/create_model", headers=KEY, json={"session_id": a.session, "model_seq_id": 1,
                                                           "base_model": "tiny"})
    assert r.status_code == 410 and "finished" in r.json()["detail"]
    assert api.post("/api/v1/get_info", headers=KEY, json={"model_id": a.model_id}).status_code == 200  # rows stay

    # The documented way back: a new session, from the checkpoint, bit-exactly where it was.
    resumed = Run.__new__(Run)
    resumed.client, resumed.seq = api, 0
    resumed.session = api.post("/api/v1/create_session", json={"tags": []}, headers=KEY).json()["session_id"]
    fut = api.post("/api/v1/load_weights", headers=KEY, json={
        "session_id": resumed.session, "model_seq_id": 0, "path": checkpoint, "optimizer": True}).json()
    resumed.model_id = future_result(api, fut["request_id"])["model_id"]
    assert resumed.train_step() > 0


def test_lapsed_session_unloads_its_runs_then_resumes_transparently_and_exactly(api, tmp_path):
    st = api.st
    a, b = Run(api, seed=1), Run(api, seed=2)
    for run in (a, b):
        run.train_step()
    sampler_id = a.sampler(0)
    a.call("forward_backward", forward_backward_input={"data": [DATUM], "loss_fn": "cross_entropy"})  # pending grads
    with _app(tmp_path / "reference") as ref_client:  # the same requests, never unloaded
        ref = Run(ref_client, seed=1)
        ref.train_step()
        ref.call("forward_backward", forward_backward_input={"data": [DATUM], "loss_fn": "cross_entropy"})
        ref.call("optim_step", adam_params={"learning_rate": 0.01})
        expected = ref.logprobs()

    st.config.session_timeout_seconds = 0.5
    time.sleep(0.6)
    assert b.heartbeat().status_code == 200  # b is alive, a went quiet
    before = api.runtime.lora.nbytes()
    api.portal.call(lifecycle.sweep, st)
    assert set(st.runs.parked) == {a.model_id}
    b.train_step()  # queued behind the unload
    assert _keys(api.runtime, a.model_id) == [] and a.model_id not in api.trainer.adapters
    assert api.runtime.lora.nbytes() < before and b.model_id in api.trainer.adapters
    assert (st.paths.parked(a.model_id) / "optimizer.safetensors").is_file()
    assert _sample(api, sampler_id).status_code == 410  # its in-memory snapshot went too

    st.config.session_timeout_seconds = 600
    a.call("optim_step", adam_params={"learning_rate": 0.01})  # restored first, gradients included
    np.testing.assert_array_equal(a.logprobs(), expected)
    assert not st.paths.parked(a.model_id).exists() and not st.runs.parked
    assert a.model_id in api.trainer.adapters


def test_background_sweep_with_a_tiny_timeout(tmp_path):
    with _app(tmp_path, session_timeout_seconds=0.3, parked_state_ttl_seconds=0) as client:
        st = client.app.state.tinkerd
        run = Run(client)
        _wait(lambda: run.model_id in st.runs.released, "the lapsed run to be released")
        _wait(lambda: run.model_id not in client.trainer.adapters, "the unload job")
        assert client.runtime.lora.nbytes() == 0
        r = run.post("optim_step", {"adam_params": {"learning_rate": 0.01}})
        assert r.status_code == 410 and "no heartbeat" in r.json()["detail"]
        assert "no save_state checkpoint" in r.json()["detail"]


def test_parked_state_expires(api):
    st = api.st
    run = Run(api)
    st.config.session_timeout_seconds = 0.2
    time.sleep(0.3)
    api.portal.call(lifecycle.sweep, st)
    assert run.model_id in st.runs.parked
    _wait(lambda: st.paths.parked(run.model_id).is_dir(), "the parked state")
    st.config.parked_state_ttl_seconds = 0.2
    time.sleep(0.3)
    api.portal.call(lifecycle.sweep, st)
    assert st.runs.released == {run.model_id: lifecycle.EXPIRED}
    _wait(lambda: not st.paths.parked(run.model_id).exists(), "the parked state to be deleted")
    r = run.post("optim_step", {"adam_params": {"learning_rate": 0.01}})
    assert r.status_code == 410 and "kept for 0.2 s" in r.json()["detail"]


def test_a_snapshot_in_use_by_a_sample_is_dropped_only_when_the_sample_finishes(api):
    run = Run(api)
    run.train_step()
    sampler_id = run.sampler(0)
    snapshot = f"{run.model_id}@1"
    api.sampler.hold.set()
    sample = _sample(api, sampler_id, max_tokens=30).json()["request_id"]
    _wait(api.sampler.holding.is_set, "the sample to start")
    assert api.runtime.lora.pins == {snapshot: 1}

    run.finish()
    _wait(lambda: run.model_id not in api.trainer.adapters, "the unload job")
    assert _keys(api.runtime, run.model_id) == [snapshot]  # the adapter went; the pinned snapshot stays
    api.sampler.hold.clear()
    api.sampler.holding.clear()
    api.portal.call(api.st.scheduler._ready.set)  # wake the engine loop
    result = future_result(api, sample)
    assert len(result["sequences"][0]["tokens"]) == 30
    assert _keys(api.runtime, run.model_id) == [] and not api.runtime.lora.pins
    assert api.runtime.lora.nbytes() == 0


def test_parked_state_left_by_an_earlier_process_is_deleted_after_the_ttl(api):
    root = api.st.config.data_dir / "unloaded"
    old, recent = root / "s-old_train_0", root / "s-recent_train_0"
    for folder in (old, recent):
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"x")
    past = time.time() - api.st.config.parked_state_ttl_seconds - lifecycle.ORPHAN_MIN_AGE_SECONDS - 1
    os.utime(old, (past, past))
    api.portal.call(lifecycle.sweep, api.st)
    assert not old.exists() and recent.is_dir()


def test_samples_of_a_lapsed_session_are_cancelled_and_free_their_rows(api):
    st = api.st
    gone, alive = Run(api, seed=1), Run(api, seed=2)
    samplers = {run: run.sampler(0) for run in (gone, alive)}
    api.sampler.hold.set()
    futures = {run: _sample(api, samplers[run], max_tokens=40).json()["request_id"] for run in (gone, alive)}
    _wait(api.sampler.holding.is_set, "samples decoding")
    st.config.session_timeout_seconds = 0.5
    time.sleep(0.6)
    alive.heartbeat()
    api.portal.call(lifecycle.sweep, st)  # `gone` sent no heartbeat for 0.6 s
    st.config.session_timeout_seconds = 600
    api.sampler.hold.clear()
    api.sampler.holding.clear()
    api.portal.call(st.scheduler._ready.set)  # wake the engine loop
    assert "sent no heartbeat" in future_result(api, futures[gone])["error"]
    assert len(future_result(api, futures[alive])["sequences"][0]["tokens"]) == 40
    _wait(lambda: api.sampler.active_rows() == 0, "the cancelled rows to be dropped")


def test_a_server_restart_parks_loaded_runs_and_the_next_process_resumes_them_exactly(tmp_path):
    with _app(tmp_path / "reference") as ref_client:  # the same requests in one process
        ref = Run(ref_client, seed=1)
        ref.train_step()
        ref.call("forward_backward", forward_backward_input={"data": [DATUM], "loss_fn": "cross_entropy"})
        ref.call("optim_step", adam_params={"learning_rate": 0.01})
        expected = ref.logprobs()

    with _app(tmp_path / "data", shutdown_park_seconds=60) as first:
        run = Run(first, seed=1)
        run.train_step()
        run.call("forward_backward", forward_backward_input={"data": [DATUM], "loss_fn": "cross_entropy"})  # pending grads
        finished = Run(first, seed=2)
        finished.finish()
    assert (tmp_path / "data" / "unloaded").is_dir()

    with _app(tmp_path / "data") as second:  # a new process: new engine, same data dir and Store
        st = second.app.state.tinkerd
        assert set(st.runs.parked) == {run.model_id}  # the finished session's run was not kept
        assert st.scheduler.models[run.model_id].next_seq == run.seq + 1 == 4  # the SDK's next seq_id runs
        run.client = second
        run.call("optim_step", adam_params={"learning_rate": 0.01})  # seq_id 4: restored first, gradients included
        np.testing.assert_array_equal(run.logprobs(), expected)
        assert not st.paths.parked(run.model_id).exists()


def test_an_inflight_client_of_a_parked_run_follows_it_when_it_is_restored(api):
    st = api.st
    run = Run(api)
    run.train_step()
    inflight = run.call("save_weights_for_sampler", sampling_session_seq_id=0, kind="inflight")["sampling_session_id"]
    assert _sample(api, inflight).status_code == 200
    st.config.session_timeout_seconds = 0.2
    time.sleep(0.3)
    api.portal.call(lifecycle.sweep, st)
    assert set(st.runs.parked) == {run.model_id}
    _wait(lambda: _keys(api.runtime, run.model_id) == [], "the run and its inflight target to be unloaded")
    assert _sample(api, inflight).status_code == 410
    st.config.session_timeout_seconds = 600
    run.train_step()  # restored first; the restore publishes the target again
    r = _sample(api, inflight)
    assert r.status_code == 200, r.text
    assert "error" not in future_result(api, r.json()["request_id"])
