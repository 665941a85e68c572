"""Bad input never hurts the server: random JSON to every JSON route and random bytes/protobufs to
forward_backward give 4xx with a JSON body naming the problem, never a 500, and the server keeps
serving."""

import json
import string

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinkerd.engine.sampler import LocalSampler
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.protocol.wire_pb import pb
from tinkerd.server.app import create_app
from tinkerd.control.plane import ServerConfig
from tests.conftest import make_tiny_runtime

KEY = {"X-API-Key": "tml-fuzz"}
FIELDS = ["session_id", "model_id", "model_seq_id", "base_model", "lora_config", "seq_id", "path", "prompt",
          "sampling_params", "num_samples", "request_id", "adam_params", "sampling_session_id", "model_path",
          "sampling_session_seq_id", "tinker_path", "ttl_seconds", "optimizer", "rank", "stop", "kind"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(string.printable, max_size=20), st.just("tiny"), st.just("tinker://x/weights/y"))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.sampled_from(FIELDS + ["chunks", "tokens"]), inner, max_size=4)),
                      max_leaves=12)
bodies = st.one_of(st.dictionaries(st.sampled_from(FIELDS), values, max_size=6), values)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    runtimes = {"tiny": make_tiny_runtime()}
    app = create_app(ServerConfig(data_dir=tmp_path_factory.mktemp("fuzz"), long_poll_seconds=0.2),
                     LocalTrainer(runtimes), LocalSampler(runtimes))
    with TestClient(app, raise_server_exceptions=False) as c:
        paths = app.openapi()["paths"]  # the JSON routes, from the OpenAPI spec
        c.fuzz_routes = sorted(p for p, ops in paths.items() if "post" in ops and "{" not in p
                               and p != "/api/v1/forward_backward")
        assert len(c.fuzz_routes) > 10
        yield c


def _check(response):
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        assert body["detail"] if "detail" in body else body["error"]["message"], response.text  # OpenAI routes' shape


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_json_gets_a_clear_4xx_never_a_500(client, data):
    route = data.draw(st.sampled_from(client.fuzz_routes), label="route")
    body = json.dumps(data.draw(bodies, label="body"))  # NaN/Infinity included, as sloppy clients send them
    _check(client.post(route, content=body, headers={**KEY, "Content-Type": "application/json"}))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=300))
def test_random_bytes_to_forward_backward(client, body):
    _check(client.post("/api/v1/forward_backward", content=body,
                       headers={**KEY, "Content-Type": "application/x-protobuf"}))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(model_id=st.text(max_size=12), seq_id=st.integers(-2**31, 2**31 - 1),
       tokens=st.binary(max_size=24), loss=st.sampled_from(["cross_entropy", "ppo", "", "nope"]),
       dense=st.binary(max_size=24), shape=st.lists(st.integers(-3, 9), max_size=3), dtype=st.integers(0, 5))
def test_well_formed_protobufs_with_wild_values(client, model_id, seq_id, tokens, loss, dense, shape, dtype):
    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn=loss)
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = tokens
    tensor = datum.loss_fn_inputs["target_tokens"]
    tensor.dense, tensor.dtype = dense, dtype
    tensor.shape.extend(shape)
    _check(client.post("/api/v1/forward_backward", content=msg.SerializeToString(),
                       headers={**KEY, "Content-Type": "application/x-protobuf"}))


def test_still_serving_after_the_fuzz(client):
    assert client.get("/api/v1/healthz").json() == {"status": "ok"}
