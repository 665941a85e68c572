"""A request refused at submit (4xx) still used its seq_id: the SDK numbers the next request after it, so the
run's later requests must not wait for that seq_id forever. Through the HTTP API on a tiny random model."""

import json

import pytest
import zstandard

from tests.app_client import OWNER_KEY as KEY
from tests.server.test_hostile_input import PROTOBUF, _fb_request, _model, capped  # noqa: F401 (a fixture)

OTHER = {"X-API-Key": "tml-other-tenant"}


def _bounded_result(api, request_id, polls=6):
    """The future's result, or None if it is still pending after `polls` long polls (the app waits 5 s each)."""
    for _ in range(polls):
        body = api.post("/api/v1/retrieve_future", json={"request_id": request_id}, headers=KEY).json()
        if body.get("type") != "try_again":
            return body
    return None


def _refusals(model_id):
    """(route, request kwargs, status, field) for seq_id 1, refused before it is queued."""
    bad_shape = _fb_request(model_id, 1)
    bad_shape.data[0].loss_fn_inputs["weights"].shape[:] = [2]
    return [
        ("forward_backward", {"content": bad_shape.SerializeToString(), "headers": {**KEY, **PROTOBUF}}, 400, "weights"),
        ("forward", {"json": {"model_id": model_id, "seq_id": 1, "forward_input": {"data": [{"model_input": {
            "chunks": [{"tokens": [3, 4]}]}, "loss_fn_inputs": {"target_tokens": {"data": [1], "dtype": "int64",
                                                                                 "shape": [1]}}}]}}}, 400, "target_tokens"),
        ("optim_step", {"json": {"model_id": model_id, "seq_id": 1, "adam_params": {"learning_rate": 1e30}}}, 400,
         "learning_rate"),
        ("optim_step", {"json": {"model_id": model_id, "seq_id": 1, "adam_params": {"learning_rate": "fast"}}}, 422,
         "learning_rate"),
        ("save_weights_for_sampler", {"json": {"model_id": model_id, "seq_id": 1, "path": "../up"}}, 400, "path"),
        ("load_weights", {"json": {"model_id": model_id, "seq_id": 1, "path": "tinker://nobody:train:0/weights/x",
                                   "optimizer": False}}, 404, "nobody"),
    ]


@pytest.mark.parametrize("case", range(6))
def test_the_request_after_a_refused_one_runs(api, case):
    _, model_id = _model(api)
    route, kwargs, status, field = _refusals(model_id)[case]
    kwargs.setdefault("headers", KEY)
    refused = api.post(f"/api/v1/{route}", **kwargs)
    assert refused.status_code == status and field in refused.text, refused.text
    fb = api.post("/api/v1/forward_backward", headers={**KEY, **PROTOBUF},
                  content=_fb_request(model_id, 2).SerializeToString()).json()
    result = _bounded_result(api, fb["request_id"])
    assert result is not None, "seq_id 2 still waits for the refused seq_id 1"
    assert "error" not in result and result["loss_fn_outputs"], result
    # the refused seq_id is spent: sent again it answers its refusal, it does not run
    again = api.post(f"/api/v1/{route}", **kwargs)
    body = again.json()
    if again.status_code == 200:
        outcome = _bounded_result(api, body["request_id"])
        assert outcome["category"] == "user" and field in outcome["error"], outcome
    else:
        assert again.status_code == status


def test_a_stranger_cannot_spend_another_tenants_seq_id(api):
    _, model_id = _model(api)
    stranger = api.post("/api/v1/optim_step", headers=OTHER, content=json.dumps(
        {"model_id": model_id, "seq_id": 1, "adam_params": {"learning_rate": "fast"}}))
    assert stranger.status_code == 422
    fb = api.post("/api/v1/forward_backward", headers={**KEY, **PROTOBUF},
                  content=_fb_request(model_id, 1).SerializeToString()).json()
    result = _bounded_result(api, fb["request_id"])
    assert result is not None and "error" not in result, result


def _next_runs(api, model_id, seq_id):
    fb = api.post("/api/v1/forward_backward", headers={**KEY, **PROTOBUF},
                  content=_fb_request(model_id, seq_id).SerializeToString()).json()
    result = _bounded_result(api, fb["request_id"])
    assert result is not None, f"seq_id {seq_id} still waits for the refused one before it"
    assert "error" not in result, result


def test_a_truncated_protobuf_body_still_holds_its_seq_id(api):
    _, model_id = _model(api)
    body = _fb_request(model_id, 1).SerializeToString()
    refused = api.post("/api/v1/forward_backward", headers={**KEY, **PROTOBUF}, content=body[:len(body) - 7])
    assert refused.status_code == 400 and "ForwardBackwardRequest" in refused.text, refused.text
    _next_runs(api, model_id, 2)


def test_a_body_refused_while_decompressing_still_holds_its_seq_id(capped):
    api = capped
    _, model_id = _model(api)
    msg = _fb_request(model_id, 1)
    msg.data[0].model_input[0].encoded_text.tokens = b"\x03\x00\x00\x00" * (api.st.config.max_decompressed_bytes // 4)
    body = zstandard.ZstdCompressor().compress(msg.SerializeToString())
    refused = api.post("/api/v1/forward_backward", headers={**KEY, **PROTOBUF, "Content-Encoding": "zstd"}, content=body)
    assert refused.status_code == 400 and "decompressed" in refused.text, refused.text
    _next_runs(api, model_id, 2)
