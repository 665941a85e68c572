"""Issue 24's defects, one regression test each, through the HTTP API on a tiny random model (vocab 128,
context 64): numeric fields out of range are a 400 naming the field at submit time, never a server error
in the future and never a 500; a row that fails in the sampler fails alone; a sparse tensor cannot declare
more cells than the datum can use; a run cannot be poisoned by its optimizer's numbers; top-k and
decompressed sizes are capped; HEAD answers on download URLs."""

import json
import threading

import numpy as np
import pytest
import zstandard
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from tinkerd.engine.interface import AdapterRef, SampleTask
from tinkerd.protocol.types import SamplingParams
from tinkerd.protocol.wire_pb import pb
from tests.app_client import OWNER_KEY as KEY, future_result

OTHER = {"X-API-Key": "tml-other-tenant"}
PROTOBUF = {"Content-Type": "application/x-protobuf"}


def _model(api, headers=KEY):
    session = api.post("/api/v1/create_session", json={"tags": []}, headers=headers).json()["session_id"]
    fut = api.post("/api/v1/create_model", headers=headers, json={
        "session_id": session, "model_seq_id": 0, "base_model": "tiny", "lora_config": {"rank": 4, "seed": 1}}).json()
    return session, future_result(api, fut["request_id"], headers)["model_id"]


def _sample_body(**params):
    return {"base_model": "tiny", "num_samples": params.pop("num_samples", 1),
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [3, 4, 5]}]},
            "sampling_params": {"max_tokens": 4, "seed": 7, **params}}


def _assert_400(response, field):
    assert response.status_code == 400, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    assert field in response.json()["detail"], response.text


# 1. seeds and other numeric sampling fields


@pytest.mark.parametrize("params, field", [
    ({"seed": 2**64}, "seed"), ({"seed": 2**64 - 1, "num_samples": 2}, "seed"), ({"seed": -2**64}, "seed"),
    ({"temperature": float("inf")}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": float("nan")}, "top_p"), ({"top_k": 2**70}, "top_k"), ({"max_tokens": float("inf")}, "max_tokens"),
    ({"max_tokens": "many"}, "max_tokens"), ({"seed": 1.5}, "seed"), ({"seed": True}, "seed"),
])
def test_numeric_sampling_fields_out_of_range_are_a_400_naming_the_field(api, params, field):
    body = json.dumps(_sample_body(**params))  # Infinity / NaN as sloppy JSON encoders write them
    _assert_400(api.post("/api/v1/asample", content=body, headers={**KEY, "Content-Type": "application/json"}), field)


@pytest.mark.parametrize("field, value", [("topk_prompt_logprobs", 10**6), ("topk_sample_logprobs", 2**40),
                                          ("prompt_alt_tokens_k", -1)])
def test_scoring_counts_beyond_their_caps_are_a_400(api, field, value):
    _assert_400(api.post("/api/v1/asample", headers=KEY, json={**_sample_body(), field: value,
                                                               "prompt_logprobs": True}), field)


def test_a_row_that_fails_in_the_sampler_fails_alone_and_the_batch_stays_sound(api, monkeypatch):
    """A request the edge let through (here one bypassing it with a seed past 2^64, whose generators fail as
    at 97fc48e) fails on its own; the other tenant's request prefilled with it completes, and later requests
    equal an undisturbed run's."""
    from tinkerd.engine import sampler as sampler_module

    def overflowing(request, real=getattr(sampler_module, "request_generators", None)):
        if request.params.seed is not None and request.params.seed >= 2**64:
            raise ValueError("Overflow when unpacking long long")
        return real(request)

    monkeypatch.setattr(sampler_module, "request_generators", overflowing, raising=False)
    sampler = api.st.sampler
    good = SamplingParams(max_tokens=4, seed=11, stop_at_eos=False)
    alone = sampler.sample(AdapterRef(None, "tiny"), [3, 4, 5], 2, good)
    bad = SamplingParams.__new__(SamplingParams)
    object.__setattr__(bad, "__dict__", {**good.__dict__, "seed": 2**64 + 5})
    sampler.submit(SampleTask("bad", AdapterRef(None, "tiny"), [9, 8, 7, 6], 2, bad))
    sampler.submit(SampleTask("good", AdapterRef(None, "tiny"), [3, 4, 5], 2, good))
    outcomes = {}
    while len(outcomes) < 2:
        outcomes.update(dict(sampler.step()))
    assert isinstance(outcomes["bad"], Exception)
    assert [s.tokens for s in outcomes["good"].sequences] == [s.tokens for s in alone.sequences]
    again = sampler.sample(AdapterRef(None, "tiny"), [3, 4, 5], 2, good)
    assert [s.tokens for s in again.sequences] == [s.tokens for s in alone.sequences]
    assert not sampler.has_work()


def test_a_failing_decode_group_fails_only_its_request(api, monkeypatch):
    """An exception while drawing one request's tokens (a bug, not bad input) fails that request only."""
    from tinkerd.engine import sampler as sampler_module

    real = sampler_module.choose_tokens

    def flaky(logits, params, generators):
        if any(p.temperature == 0.5 for p in params):
            raise RuntimeError("boom in one group")
        return real(logits, params, generators)

    sampler = api.st.sampler
    good = SamplingParams(max_tokens=4, seed=11, stop_at_eos=False)
    alone = sampler.sample(AdapterRef(None, "tiny"), [3, 4, 5], 1, good)
    monkeypatch.setattr(sampler_module, "choose_tokens", flaky)
    sampler.submit(SampleTask("bad", AdapterRef(None, "tiny"), [9, 8], 1, SamplingParams(max_tokens=4, temperature=0.5)))
    sampler.submit(SampleTask("good", AdapterRef(None, "tiny"), [3, 4, 5], 1, good))
    outcomes = {}
    while len(outcomes) < 2:
        outcomes.update(dict(sampler.step()))
    assert isinstance(outcomes["bad"], Exception) and "boom" in str(outcomes["bad"])
    assert outcomes["good"].sequences[0].tokens == alone.sequences[0].tokens
    assert not sampler.has_work()


def test_a_failed_decode_forward_fails_its_batch_cleanly_and_sampling_goes_on(api, monkeypatch):
    """A shared forward that raises (no row to blame) fails the rows in flight, and leaves no state behind."""
    sampler = api.st.sampler
    good = SamplingParams(max_tokens=4, seed=11, stop_at_eos=False)
    alone = sampler.sample(AdapterRef(None, "tiny"), [3, 4, 5], 1, good)
    decoder = sampler.decoders["tiny"]
    real, calls = decoder.decode, []

    def once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the forward broke")
        return real(*args, **kwargs)

    monkeypatch.setattr(decoder, "decode", once)
    sampler.submit(SampleTask("a", AdapterRef(None, "tiny"), [3, 4, 5], 2, good))
    outcomes = {}
    while sampler.has_work():
        outcomes.update(dict(sampler.step()))
    assert isinstance(outcomes["a"], RuntimeError)
    assert sampler.sample(AdapterRef(None, "tiny"), [3, 4, 5], 1, good).sequences[0].tokens == alone.sequences[0].tokens


# 2. wrong JSON types


@pytest.mark.parametrize("route", ["/api/v1/forward", "/api/v1/forward_backward"])
@pytest.mark.parametrize("patch, field", [({"tokens": ["3", "x"]}, "tokens"), ({"seq_id": "one"}, "seq_id"),
                                          ({"seq_id": 2**70}, "seq_id"), ({"tokens": [2**70]}, "tokens")])
def test_wrong_json_types_in_forward_bodies_are_a_400(api, route, patch, field):
    _, model_id = _model(api)
    chunk = {"type": "encoded_text", "tokens": patch.get("tokens", [3, 4, 5])}
    datum = {"model_input": {"chunks": [chunk]},
             "loss_fn_inputs": {"target_tokens": {"data": [4, 5, 6], "dtype": "int64", "shape": [3]}}}
    body = {"model_id": model_id, "seq_id": patch.get("seq_id", 1),
            "forward_backward_input": {"data": [datum], "loss_fn": "cross_entropy"}}
    _assert_400(api.post(route, headers={**KEY, "Content-Type": "application/json"}, content=json.dumps(body)), field)


@pytest.mark.parametrize("route", ["/api/v1/training_runs", "/api/v1/checkpoints", "/api/v1/sessions"])
@pytest.mark.parametrize("offset", [2**63, 2**64 + 1])
def test_list_offsets_beyond_int64_are_a_400(api, route, offset):
    _assert_400(api.get(f"{route}?offset={offset}", headers=KEY), "offset")


# 3. a tiny body declaring a huge sparse tensor


def _fb_request(model_id, seq_id, shape=None, weights=None, advantages=None):
    datum = types.Datum(model_input=types.ModelInput.from_ints([3, 4, 5]),
                        loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.array([4, 5, 6])),
                                        "weights": types.TensorData.from_numpy(
                                            np.asarray(weights if weights is not None else [1, 1, 1], np.float32))})
    req = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(
        data=[datum], loss_fn="cross_entropy"), model_id=model_id, seq_id=seq_id)
    return forward_backward_request_to_proto(req)


@pytest.mark.parametrize("shape", [[3, 2**28], [2**28, 1], [3, 129]])
def test_sparse_tensors_declaring_more_cells_than_the_datum_has_are_a_400(api, shape):
    _, model_id = _model(api)
    msg = _fb_request(model_id, 1)
    tensor = msg.data[0].loss_fn_inputs["target_tokens"]
    tensor.ClearField("dense")
    tensor.ClearField("shape")
    tensor.shape.extend(shape)
    tensor.sparse_csr.values = np.array([4], "<i8").tobytes()
    tensor.sparse_csr.crow_indices = np.array([0, 1] + [1] * (shape[0] - 1) if shape[0] < 10 else [0, 1], "<i8").tobytes()
    tensor.sparse_csr.col_indices = np.array([0], "<i8").tobytes()
    body = msg.SerializeToString()
    assert len(body) < 300
    _assert_400(api.post("/api/v1/forward_backward", headers={**KEY, **PROTOBUF}, content=body), "target_tokens")


# 4. a run poisoned by a number


@pytest.mark.parametrize("adam, field", [({"learning_rate": float("inf")}, "learning_rate"),
                                         ({"learning_rate": 1e30}, "learning_rate"),
                                         ({"weight_decay": 1e308}, "weight_decay"),
                                         ({"eps": float("nan")}, "eps"), ({"grad_clip_norm": float("inf")}, "grad_clip_norm")])
def test_absurd_adam_params_are_a_400(api, adam, field):
    _, model_id = _model(api)
    body = json.dumps({"model_id": model_id, "seq_id": 1, "adam_params": adam})
    _assert_400(api.post("/api/v1/optim_step", content=body, headers={**KEY, "Content-Type": "application/json"}), field)


def test_a_step_that_would_make_weights_non_finite_is_refused_and_the_run_keeps_working(api):
    """Weights of 3e38 overflow the loss to infinity; the JSON result must not be a 500, the step is refused,
    and the run still trains and samples afterwards with its last good weights."""
    _, model_id = _model(api)
    runtime = api.st.trainer.runtimes["tiny"]
    before = {n: p.detach().clone() for n, p in runtime.lora.named_parameters(model_id)}
    fb = api.post("/api/v1/forward_backward", headers={**KEY, **PROTOBUF},
                  content=_fb_request(model_id, 1, weights=[3e38, 3e38, 3e38]).SerializeToString()).json()
    r = api.post("/api/v1/retrieve_future", headers=KEY, json={"request_id": fb["request_id"]})  # JSON, not protobuf
    assert r.status_code == 200, r.text
    step = api.post("/api/v1/optim_step", headers=KEY,
                    json={"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 1.0}}).json()
    outcome = future_result(api, step["request_id"])
    assert outcome.get("category") == "user" and "weights unchanged" in outcome["error"], outcome
    after = dict(runtime.lora.named_parameters(model_id))
    assert all(bool(torch_equal(before[n], after[n])) for n in before)
    fb = api.post("/api/v1/forward_backward", headers={**KEY, **PROTOBUF},
                  content=_fb_request(model_id, 3).SerializeToString()).json()
    assert "error" not in future_result(api, fb["request_id"])
    step = api.post("/api/v1/optim_step", headers=KEY,
                    json={"model_id": model_id, "seq_id": 4, "adam_params": {"learning_rate": 0.01}}).json()
    assert future_result(api, step["request_id"])["metrics"]["grad_norm:mean"] > 0
    fut = api.post("/api/v1/save_weights_for_sampler", headers=KEY,
                   json={"model_id": model_id, "seq_id": 5, "sampling_session_seq_id": 1}).json()
    sampler_id = future_result(api, fut["request_id"])["sampling_session_id"]
    sample = api.post("/api/v1/asample", headers=KEY, json={**_sample_body(), "base_model": None,
                                                           "sampling_session_id": sampler_id}).json()
    assert len(future_result(api, sample["request_id"])["sequences"][0]["tokens"]) >= 1


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


# 5. bounded work per request


@pytest.fixture
def capped(tmp_path):
    """The app with a 1 MiB cap on decompressed bodies."""
    from fastapi.testclient import TestClient

    from tinkerd.control.plane import ServerConfig
    from tinkerd.engine.sampler import LocalSampler
    from tinkerd.engine.trainer import LocalTrainer
    from tinkerd.server.app import create_app
    from tests.conftest import make_tiny_runtime

    runtimes = {"tiny": make_tiny_runtime()}
    config = ServerConfig(data_dir=tmp_path, long_poll_seconds=5, max_decompressed_bytes=1 << 20)
    with TestClient(create_app(config, LocalTrainer(runtimes), LocalSampler(runtimes))) as client:
        client.st = client.app.state.tinkerd
        yield client


def test_a_zstd_body_expanding_past_the_cap_is_a_400_before_decoding(capped):
    api = capped
    _, model_id = _model(api)
    limit = api.st.config.max_decompressed_bytes
    msg = _fb_request(model_id, 1)
    msg.data[0].model_input[0].encoded_text.tokens = b"\x03\x00\x00\x00" * (limit // 4 + 16)
    body = zstandard.ZstdCompressor().compress(msg.SerializeToString())
    assert len(body) < 64 * 1024
    r = api.post("/api/v1/forward_backward", headers={**KEY, **PROTOBUF, "Content-Encoding": "zstd"}, content=body)
    _assert_400(r, "decompressed")


def _while_blocked(api, monkeypatch, target, name, expensive, meanwhile=None):
    """Run `expensive()` in a thread while `target.name` is held up inside it; returns what `meanwhile()` returned
    then (by default what healthz and another tenant's submit answered); the expensive call must still be in
    progress after it."""
    entered, release = threading.Event(), threading.Event()
    original = getattr(target, name)

    def held(*args, **kwargs):
        entered.set()
        release.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, held)
    worker = threading.Thread(target=expensive)
    worker.start()
    try:
        assert entered.wait(30), "the expensive request never reached the step it is held at"
        answered = meanwhile() if meanwhile else (api.get("/api/v1/healthz"),
                                                  api.post("/api/v1/create_session", json={"tags": []}, headers=OTHER))
        still_running = worker.is_alive()
    finally:
        release.set()
        worker.join(60)
    assert still_running
    return answered


def test_healthz_and_other_tenants_answer_while_a_body_is_being_decompressed(api, monkeypatch):
    from tinkerd.server.routes import training

    _, model_id = _model(api)
    body = zstandard.ZstdCompressor().compress(_fb_request(model_id, 1).SerializeToString())
    health, other = _while_blocked(api, monkeypatch, training, "decompress_body", lambda: api.post(
        "/api/v1/forward_backward", headers={**KEY, **PROTOBUF, "Content-Encoding": "zstd"}, content=body))
    assert health.json() == {"status": "ok"} and other.status_code == 200


def test_healthz_and_other_tenants_answer_while_the_engine_is_busy_on_a_sample(api, monkeypatch):
    sampler = api.st.scheduler.sampler
    health, other = _while_blocked(api, monkeypatch, sampler, "step", lambda: future_result(api, api.post(
        "/api/v1/asample", headers=KEY, json=_sample_body(topk_prompt_logprobs=0)).json()["request_id"]))
    assert health.json() == {"status": "ok"} and other.status_code == 200


# 6. Submits do not queue behind the engine


def test_every_submit_and_a_finished_retrieve_answer_while_the_engine_is_held_inside_a_sample_step(api, monkeypatch):
    """Heartbeats, sample and forward submits and the retrieve of a finished future never wait for the engine:
    with its thread held inside a decode step they all answer (the work they queue stays pending)."""
    session, model_id = _model(api, OTHER)
    finished = api.post("/api/v1/create_model", headers=OTHER, json={
        "session_id": session, "model_seq_id": 1, "base_model": "tiny", "lora_config": {"rank": 4}}).json()
    future_result(api, finished["request_id"], OTHER)

    def meanwhile():
        heartbeat = api.post("/api/v1/session_heartbeat", headers=OTHER, json={"session_id": session})
        sample = api.post("/api/v1/asample", headers=OTHER, json=_sample_body())
        body = _fb_request(model_id, 1)
        body.forward_only = True
        forward = api.post("/api/v1/forward_backward", headers={**OTHER, **PROTOBUF}, content=body.SerializeToString())
        retrieved = api.post("/api/v1/retrieve_future", headers=OTHER, json={"request_id": finished["request_id"]})
        return heartbeat, sample, forward, retrieved

    sampler = api.st.scheduler.sampler
    heartbeat, sample, forward, retrieved = _while_blocked(api, monkeypatch, sampler, "step", lambda: future_result(
        api, api.post("/api/v1/asample", headers=KEY, json=_sample_body(max_tokens=64)).json()["request_id"]), meanwhile)
    assert heartbeat.status_code == 200, heartbeat.text
    assert sample.status_code == 200 and sample.json()["request_id"], sample.text
    assert forward.status_code == 200 and forward.json()["request_id"], forward.text
    assert retrieved.status_code == 200 and retrieved.json()["model_id"], retrieved.text
    # what they queued behind the held step is answered once it is released
    assert len(future_result(api, sample.json()["request_id"], OTHER)["sequences"]) == 1
    assert len(future_result(api, forward.json()["request_id"], OTHER)["loss_fn_outputs"]) == 1


# 8. HEAD on download URLs


def test_head_on_a_download_url_answers_its_headers_without_a_body(api):
    _, model_id = _model(api)
    fut = api.post("/api/v1/save_weights_external", headers=KEY,
                   json={"model_id": model_id, "path": "hf", "seq_id": 1}).json()
    future_result(api, fut["request_id"])
    parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(f"tinker://{model_id}/external_weights/hf")
    urls = api.get(f"/api/v1/training_runs/{parsed.training_run_id}/checkpoints/{parsed.checkpoint_id}"
                   "/external_weights_urls", headers=KEY).json()["urls"]
    url = next(iter(urls.values()))[len(str(api.base_url)):]
    got = api.get(url)
    head = api.head(url)
    assert head.status_code == 200, head.text
    assert head.content == b""
    assert head.headers["content-length"] == got.headers["content-length"] == str(len(got.content))
    assert head.headers["content-type"] == got.headers["content-type"]
    assert api.head(url + "x").status_code == 404
