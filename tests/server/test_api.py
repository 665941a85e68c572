"""The HTTP front end on a tiny random model, in-process (FastAPI TestClient): ordering, dedupe, errors, auth."""

import numpy as np
import pytest
from fastapi.testclient import TestClient
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output

from tinkerd.engine.sampler import LocalSampler
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.server.app import create_app
from tinkerd.control.plane import ServerConfig
from tests.conftest import make_tiny_runtime

KEY = {"X-API-Key": "tml-test"}


class RecordingTrainer(LocalTrainer):
    def __init__(self, runtimes):
        super().__init__(runtimes)
        self.calls = []

    def forward_backward_many(self, calls):
        self.calls += [("forward_backward", call.seq_id) for call in calls]
        return super().forward_backward_many(calls)

    def optim_step(self, model_id, params):
        self.calls.append(("optim_step", params.learning_rate))
        return super().optim_step(model_id, params)


@pytest.fixture
def api(tmp_path):
    runtimes = {"tiny": make_tiny_runtime()}
    trainer = RecordingTrainer(runtimes)
    app = create_app(ServerConfig(data_dir=tmp_path, long_poll_seconds=5), trainer, LocalSampler(runtimes))
    with TestClient(app) as client:
        client.trainer = trainer
        yield client


def _result(client, request_id, proto=False):
    headers = {**KEY, "Accept": "application/x-protobuf"} if proto else KEY
    while True:
        r = client.post("/api/v1/retrieve_future", json={"request_id": request_id}, headers=headers)
        assert r.status_code == 200, r.text
        if r.headers["content-type"].startswith("application/x-protobuf"):
            return r.content
        body = r.json()
        if body.get("type") != "try_again":
            return body


def _model(client):
    session = client.post("/api/v1/create_session", json={"tags": []}, headers=KEY).json()["session_id"]
    fut = client.post("/api/v1/create_model", headers=KEY, json={
        "session_id": session, "model_seq_id": 0, "base_model": "tiny", "lora_config": {"rank": 4, "seed": 1}}).json()
    assert _result(client, fut["request_id"]) == {"model_id": f"{session}:train:0", "type": "create_model"}
    return session, fut["model_id"]


def _fb_body(model_id, seq_id):
    datum = types.Datum(model_input=types.ModelInput.from_ints([3, 4, 5]),
                        loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.array([4, 5, 6])),
                                        "weights": types.TensorData.from_numpy(np.ones(3, dtype=np.float32))})
    req = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(
        data=[datum], loss_fn="cross_entropy"), model_id=model_id, seq_id=seq_id)
    return forward_backward_request_to_proto(req).SerializeToString()


def test_out_of_order_requests_run_in_seq_order_and_retries_dedupe(api):
    _, model_id = _model(api)
    pb = {**KEY, "Content-Type": "application/x-protobuf"}
    optim = api.post("/api/v1/optim_step", headers=KEY,
                     json={"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.01}}).json()
    retry = api.post("/api/v1/optim_step", headers=KEY,
                     json={"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.01}}).json()
    assert retry["request_id"] == optim["request_id"]
    fb = api.post("/api/v1/forward_backward", headers=pb, content=_fb_body(model_id, 1)).json()
    out = deserialize_forward_backward_output(_result(api, fb["request_id"], proto=True))
    assert out.loss_fn_outputs[0]["logprobs"].shape == [3] and "loss:sum" in out.metrics
    assert _result(api, optim["request_id"])["metrics"]["grad_norm:mean"] > 0
    assert api.trainer.calls == [("forward_backward", 1), ("optim_step", 0.01)]


def test_bad_inputs_get_json_errors_naming_the_field(api):
    session, model_id = _model(api)
    r = api.post("/api/v1/create_model", headers=KEY, json={"session_id": session, "model_seq_id": "x", "base_model": "tiny"})
    assert r.status_code == 422 and "model_seq_id" in r.text
    r = api.post("/api/v1/forward_backward", headers={**KEY, "Content-Type": "application/x-protobuf"}, content=b"\xff\x00junk")
    assert r.status_code == 400 and "ForwardBackwardRequest" in r.json()["detail"]
    r = api.post("/api/v1/get_info", headers=KEY, json={"model_id": "nope:train:0"})
    assert r.status_code == 404 and "nope:train:0" in r.json()["detail"]
    r = api.post("/api/v1/optim_step", headers=KEY, json={"model_id": model_id, "seq_id": 1, "adam_params": {"beta1": 2}})
    assert r.status_code == 400 and "adam_params.beta1" in r.json()["detail"]
    fut = api.post("/api/v1/create_model", headers=KEY, json={
        "session_id": session, "model_seq_id": 5, "base_model": "tiny", "lora_config": {"rank": 0}}).json()
    assert _result(api, fut["request_id"]) == {"error": "lora_config.rank must be in [1, 128], got 0", "category": "user"}


def test_other_keys_see_nothing_and_non_tml_keys_are_refused(api):
    _, model_id = _model(api)
    r = api.post("/api/v1/get_info", headers={"X-API-Key": "tml-someone-else"}, json={"model_id": model_id})
    assert r.status_code == 404
    r = api.post("/api/v1/create_session", headers={"X-API-Key": "sk-wrong"}, json={})
    assert r.status_code == 401 and r.json()["detail"]


def test_sampling_session_from_ephemeral_weights(api):
    session, model_id = _model(api)
    fut = api.post("/api/v1/save_weights_for_sampler", headers=KEY,
                   json={"model_id": model_id, "seq_id": 1, "sampling_session_seq_id": 7}).json()
    sampler_id = _result(api, fut["request_id"])["sampling_session_id"]
    assert sampler_id == f"{session}:sample:7"
    r = api.post("/api/v1/asample", headers=KEY, json={
        "sampling_session_id": sampler_id, "num_samples": 3, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [3, 4]}]},
        "sampling_params": {"max_tokens": 5, "seed": 3, "stop": []}}).json()
    assert len(r["sample_sequence_ids"]) == 3
    result = _result(api, r["request_id"])
    assert [len(s["tokens"]) for s in result["sequences"]] == [5, 5, 5]
    assert api.get(f"/api/v1/samplers/{sampler_id}", headers=KEY).json()["base_model"] == "tiny"


def test_metrics_count_requests_and_trained_tokens(api):
    _, model_id = _model(api)
    fb = api.post("/api/v1/forward_backward", headers={**KEY, "Content-Type": "application/x-protobuf"},
                  content=_fb_body(model_id, 1)).json()
    _result(api, fb["request_id"])
    text = api.get("/metrics").text
    assert 'tinkerd_request_seconds_count{method="POST",route="/api/v1/forward_backward",status="200"} 1.0' in text
    assert "tinkerd_tokens_trained_total 3.0" in text
    assert "tinkerd_training_queue_depth 0.0" in text
