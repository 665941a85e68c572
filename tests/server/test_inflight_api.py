"""`save_weights_for_sampler(kind="inflight")` through the HTTP API on a tiny random model: every inflight
sampling session of a run samples its newest inflight save, a snapshot session keeps its weights, and the
kind is checked."""

from tests.app_client import OWNER_KEY as KEY, future_result
from tests.server.test_hostile_input import PROTOBUF, _fb_request, _model


def _save(api, model_id, seq_id, sampler_seq, kind):
    body = {"model_id": model_id, "seq_id": seq_id, "sampling_session_seq_id": sampler_seq, "kind": kind}
    fut = api.post("/api/v1/save_weights_for_sampler", headers=KEY, json=body).json()
    return future_result(api, fut["request_id"])["sampling_session_id"]


def _greedy(api, sampler_id):
    fut = api.post("/api/v1/asample", headers=KEY, json={
        "sampling_session_id": sampler_id, "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [3, 4, 5]}]},
        "sampling_params": {"max_tokens": 8, "temperature": 0.0}}).json()
    return future_result(api, fut["request_id"])["sequences"][0]["tokens"]


def _train(api, model_id, seq_id):
    fb = api.post("/api/v1/forward_backward", headers={**KEY, **PROTOBUF},
                  content=_fb_request(model_id, seq_id).SerializeToString()).json()
    assert "error" not in future_result(api, fb["request_id"])
    step = api.post("/api/v1/optim_step", headers=KEY, json={
        "model_id": model_id, "seq_id": seq_id + 1, "adam_params": {"learning_rate": 0.5}}).json()
    assert future_result(api, step["request_id"])["metrics"]["grad_norm:mean"] > 0


def test_old_inflight_sessions_sample_the_newest_save_and_snapshots_keep_theirs(api):
    _, model_id = _model(api)
    _train(api, model_id, 1)
    old_inflight = _save(api, model_id, 3, 0, "inflight")
    w1_snapshot = _save(api, model_id, 4, 1, "snapshot")
    w1 = _greedy(api, w1_snapshot)
    assert _greedy(api, old_inflight) == w1
    for seq_id in (5, 7, 9):
        _train(api, model_id, seq_id)
    new_inflight = _save(api, model_id, 11, 2, "inflight")
    w2_snapshot = _save(api, model_id, 12, 3, "snapshot")
    w2 = _greedy(api, w2_snapshot)
    assert w2 != w1, "training did not change the greedy answer; the test cannot tell the weights apart"
    assert _greedy(api, old_inflight) == w2
    assert _greedy(api, new_inflight) == w2
    assert _greedy(api, w1_snapshot) == w1
    rows = [api.st.store.sampling_session(s) for s in (old_inflight, new_inflight, w1_snapshot)]
    assert [r["inflight_of"] for r in rows] == [model_id, model_id, None]


def test_an_unknown_kind_is_a_422_naming_kind(api):
    _, model_id = _model(api)
    r = api.post("/api/v1/save_weights_for_sampler", headers=KEY, json={
        "model_id": model_id, "seq_id": 1, "sampling_session_seq_id": 0, "kind": "live"})
    assert r.status_code == 422 and "kind" in r.json()["detail"], r.text
