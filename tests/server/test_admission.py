"""Per-key sample limits that queue: a key flooding sample requests waits for its own earlier requests (its
polls say paused_rate_limit, with a reason), another key's request goes straight into the sampler, and every
request completes. The sampler is held still while the state is checked, so nothing here depends on timing."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tinkerd.control.plane import ServerConfig
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.server.app import create_app
from tests.app_client import future_result
from tests.conftest import make_tiny_runtime
from tests.control.test_lifecycle import PROMPT, HoldingSampler

FLOODER, OTHER = {"X-API-Key": "tml-flooder"}, {"X-API-Key": "tml-other"}
COST = 2 + 8  # one sample of the 2-token PROMPT with max_tokens 8


@pytest.fixture
def api(tmp_path):
    runtime = make_tiny_runtime()
    sampler = HoldingSampler({"tiny": runtime})
    app = create_app(ServerConfig(data_dir=tmp_path, long_poll_seconds=0.3, max_queued_sample_tokens_per_key=2 * COST),
                     LocalTrainer({"tiny": runtime}), sampler)
    with TestClient(app) as client:
        client.st, client.sampler = app.state.tinkerd, sampler
        yield client


def _resume(api):
    api.sampler.hold.clear()
    api.sampler.holding.clear()
    api.portal.call(api.st.scheduler._ready.set)  # wake the engine loop


def _sample(api, headers):
    r = api.post("/api/v1/asample", headers=headers, json={
        "base_model": "tiny", "num_samples": 1, "prompt": PROMPT,
        "sampling_params": {"max_tokens": 8, "seed": 1, "stop": []}})
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def test_a_flooding_key_waits_its_turn_and_another_key_goes_straight_in(api):
    api.sampler.hold.set()
    flood = [_sample(api, FLOODER) for _ in range(6)]
    assert api.sampler.holding.wait(30)  # the first two run (and stop: held), four wait for the key's turn
    assert set(api.st.scheduler.samples) == set(flood[:2])
    other = _sample(api, OTHER)
    assert other in api.st.scheduler.samples  # not behind the flood
    poll = api.post("/api/v1/retrieve_future", headers=FLOODER, json={"request_id": flood[4]}).json()
    assert poll["type"] == "try_again" and poll["queue_state"] == "paused_rate_limit"
    assert "20 sample tokens in the sampler (limit 20, --max-queued-sample-tokens-per-key)" in poll["queue_state_reason"]
    running = api.post("/api/v1/retrieve_future", headers=FLOODER, json={"request_id": flood[0]}).json()
    assert running["type"] == "try_again" and running["queue_state"] == "active"

    _resume(api)
    results = {f: future_result(api, f, FLOODER) for f in flood}
    results[other] = future_result(api, other, OTHER)
    assert all(len(r["sequences"][0]["tokens"]) == 8 for r in results.values())
    finished = {f: api.st.store.future(f)["finished"] for f in results}
    assert finished[other] < min(finished[f] for f in flood[2:])  # it did not wait for the flood
    assert api.st.admission.waiting == 0 and sum(api.st.admission.in_sampler.values()) == 0


def test_a_waiting_request_can_be_cancelled_and_the_limit_is_off_by_default(api, tmp_path):
    api.sampler.hold.set()
    flood = [_sample(api, FLOODER) for _ in range(3)]
    assert api.sampler.holding.wait(30)
    assert api.post("/api/v1/cancel_future", headers=FLOODER, json={"request_id": flood[2]}).status_code == 200
    assert api.st.admission.waiting == 0
    assert future_result(api, flood[2], FLOODER)["category"] == "user"
    _resume(api)
    assert all("sequences" in future_result(api, f, FLOODER) for f in flood[:2])
    assert ServerConfig(data_dir=tmp_path).max_queued_sample_tokens_per_key == 0


def _create(api, headers, session, seq=0):
    r = api.post("/api/v1/create_model", headers=headers, json={
        "session_id": session, "model_seq_id": seq, "base_model": "tiny", "lora_config": {"rank": 4}})
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def _session(api, headers):
    return api.post("/api/v1/create_session", json={"tags": []}, headers=headers).json()["session_id"]


def test_runs_per_key_queue_until_one_of_the_keys_runs_is_released(tmp_path):
    runtime = make_tiny_runtime()
    app = create_app(ServerConfig(data_dir=tmp_path, long_poll_seconds=0.3, max_runs_per_key=1),
                     LocalTrainer({"tiny": runtime}), HoldingSampler({"tiny": runtime}))
    with TestClient(app) as api:
        first_session, second_session = _session(api, FLOODER), _session(api, FLOODER)
        assert "model_id" in future_result(api, _create(api, FLOODER, first_session), FLOODER)
        waiting = _create(api, FLOODER, second_session)
        poll = api.post("/api/v1/retrieve_future", headers=FLOODER, json={"request_id": waiting}).json()
        assert poll["type"] == "try_again" and poll["queue_state"] == "paused_rate_limit"
        assert "concurrent training runs limit" in poll["queue_state_reason"] and "limit 1" in poll["queue_state_reason"]
        assert "model_id" in future_result(api, _create(api, OTHER, _session(api, OTHER)), OTHER)  # not held up
        assert api.post(f"/api/v1/sessions/{first_session}/finish", headers=FLOODER).status_code == 200
        assert "model_id" in future_result(api, waiting, FLOODER)  # created once the first run was released


@pytest.fixture
def small_sampler(tmp_path):
    """The app with room for 3 sample rows in the sampler, no per-key limit."""
    runtime = make_tiny_runtime()
    sampler = HoldingSampler({"tiny": runtime})
    app = create_app(ServerConfig(data_dir=tmp_path, long_poll_seconds=0.3, max_sampler_rows=3),
                     LocalTrainer({"tiny": runtime}), sampler)
    with TestClient(app) as client:
        client.st, client.sampler = app.state.tinkerd, sampler
        yield client


def test_past_the_samplers_capacity_requests_wait_paused_capacity_keys_take_turns_and_all_complete(small_sampler):
    api = small_sampler
    api.sampler.hold.set()
    flood = [_sample(api, FLOODER) for _ in range(5)]
    assert api.sampler.holding.wait(30)
    assert set(api.st.scheduler.samples) == set(flood[:3])  # 3 rows: the capacity
    other = _sample(api, OTHER)
    assert other not in api.st.scheduler.samples
    poll = api.post("/api/v1/retrieve_future", headers=OTHER, json={"request_id": other}).json()
    assert poll["type"] == "try_again" and poll["queue_state"] == "paused_capacity"
    assert "3 rows decoding (limit 3, --max-sampler-rows)" in poll["queue_state_reason"]
    assert api.st.admission.queue_state(flood[4])[0] == "paused_capacity"

    _resume(api)
    results = {f: future_result(api, f, FLOODER) for f in flood}
    results[other] = future_result(api, other, OTHER)
    assert all(len(r["sequences"][0]["tokens"]) == 8 for r in results.values())
    finished = {f: api.st.store.future(f)["finished"] for f in results}
    assert finished[other] <= max(finished[f] for f in flood[3:])  # its turn came before the flood's last
    assert api.st.admission.waiting == 0 and api.st.admission.rows_in_sampler == 0
