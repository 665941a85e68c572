"""Server-side custom losses end to end: the official SDK uploads a traced loss once and `forward_backward_custom`
runs it here in one forward_backward, with the same loss, metrics and gradients as the SDK's client-side path on
the same loss; handles are per session; datums are checked; hostile graphs never reach the engine; a crash replays
a custom-loss request from its stored definition."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from tinkerd.control.scheduler import Job, Outcome
from tinkerd.engine.losses import custom as engine_custom
from tests.app_client import OWNER_KEY as KEY, future_result
from tests.control.test_lifecycle import DATUM, Run, _app
from tests.custom_loss_cases import CASES, definition
from tests.inprocess_server import inprocess_server


def _datums(name: str) -> list[types.Datum]:
    rng = np.random.default_rng(1)
    out = []
    for n in (9, 6, 12):
        tokens = rng.integers(2, 120, n + 1)
        target = tokens[1:]
        inputs: dict = {}
        if name == "dpo":
            chosen = (np.arange(n) < n // 2).astype(np.float32)
            inputs = {"ref_logprobs": rng.uniform(-6, -3, n).astype(np.float32), "chosen_mask": chosen,
                      "rejected_mask": 1 - chosen, "beta": torch.tensor(0.5)}
        elif name == "weighted_nll":
            inputs = {"weights": rng.uniform(-0.5, 1.5, n).astype(np.float32)}
        else:
            target = rng.integers(2, 120, (n, 3))
            inputs = {"probs": rng.dirichlet(np.ones(3), n).astype(np.float32)}
        out.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
                               loss_fn_inputs={"target_tokens": np.asarray(target, dtype=np.int64), **inputs}))
    return out


@pytest.fixture(scope="module")
def sdk(tmp_path_factory):
    with inprocess_server(tmp_path_factory.mktemp("custom-loss")) as (url, trainer):
        yield tinker.ServiceClient(base_url=url, api_key="tml-custom"), trainer


def _grads(trainer, model_id):
    return [p.grad.detach().clone() for p in trainer.runtimes["tiny"].lora.parameters(model_id)]


@pytest.mark.parametrize("name", list(CASES))
def test_server_side_equals_client_side_loss_metrics_and_gradients(sdk, name):
    service, trainer = sdk
    fn, ranks = CASES[name]
    handle = service.create_custom_loss(fn, ranks).result()
    assert handle.loss_id and handle.loss_id.endswith(":loss:" + handle.loss_id.rsplit(":", 1)[1])
    server_run = service.create_lora_training_client(base_model="tiny", rank=4, seed=3).result()
    client_run = service.create_lora_training_client(base_model="tiny", rank=4, seed=3).result()
    data = _datums(name)
    server = server_run.forward_backward_custom(data, handle).result()
    client = client_run.forward_backward_custom(data, dataclasses.replace(handle, loss_id=None)).result()

    assert "surrogate_loss:sum" in client.metrics and "surrogate_loss:sum" not in server.metrics  # two paths indeed
    client.metrics.pop("surrogate_loss:sum")
    assert server.metrics.keys() == client.metrics.keys()
    for key, value in client.metrics.items():
        assert server.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for got, want in zip(server.loss_fn_outputs, client.loss_fn_outputs):
        np.testing.assert_allclose(got["logprobs"].to_numpy(), want["logprobs"].to_numpy(), rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(trainer, server_run.model_id), _grads(trainer, client_run.model_id)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in _grads(trainer, server_run.model_id))


def test_config_flag_and_elementwise_loss_reach_the_sdk(sdk):
    service, _ = sdk
    assert service.holder.get_client_config().custom_loss_server_side is True
    run = service.create_lora_training_client(base_model="tiny", rank=4, seed=0).result()
    data = _datums("weighted_nll")
    out = run.forward(data, "cross_entropy").result()
    for datum, output in zip(data, out.loss_fn_outputs):
        elementwise = output["elementwise_loss"].to_numpy()
        assert list(elementwise.shape) == list(datum.loss_fn_inputs["target_tokens"].shape)
        np.testing.assert_allclose(elementwise, -datum.loss_fn_inputs["weights"].to_numpy()
                                   * output["logprobs"].to_numpy(), rtol=1e-6, atol=1e-7)
    total = sum(float(o["elementwise_loss"].to_numpy().sum()) for o in out.loss_fn_outputs)
    assert total == pytest.approx(out.metrics["loss:sum"], rel=1e-5)


# ---------------------------------------------------------------- the raw routes (TestClient)

def _create(client, session, seq=0, body=None, headers=KEY):
    return client.post("/api/v1/create_custom_loss", headers=headers, json={
        "session_id": session, "custom_loss_seq_id": seq, "type": "create_custom_loss",
        **(body or definition("weighted_nll"))})


def _loss_id(client, session, seq=0):
    r = _create(client, session, seq)
    assert r.status_code == 200, r.text
    return future_result(client, r.json()["request_id"])["loss_id"]


NLL_DATUM = {**DATUM, "loss_fn_inputs": {**DATUM["loss_fn_inputs"],
                                         "weights": {"data": [1.0, 0.5, 0.0, 2.0], "dtype": "float32", "shape": [4]}}}


def _custom_fb(loss_id, datum=NLL_DATUM):
    return {"forward_backward_input": {"data": [datum], "loss_fn": "custom", "loss_fn_config": {"loss_id": loss_id}}}


@pytest.fixture
def api(tmp_path):
    with _app(tmp_path) as client:
        client.st = client.app.state.tinkerd
        yield client


def test_handles_are_per_session_and_per_key(api):
    run, other_session = Run(api), Run(api)
    loss_id = _loss_id(api, run.session)
    assert _loss_id(api, run.session) == loss_id  # a retried create gets the same id
    assert run.call("forward_backward", **_custom_fb(loss_id))["metrics"]["loss:sum"] > 0
    r = other_session.post("forward_backward", _custom_fb(loss_id))
    assert r.status_code == 404 and "not found in this training run's session" in r.json()["detail"]
    r = _create(api, run.session, 1, headers={"X-API-Key": "tml-someone-else"})
    assert r.status_code == 404  # another key cannot add losses to this session either
    r = run.post("forward_backward", _custom_fb("s-nope:loss:0"))
    assert r.status_code == 404


def test_datum_ranks_are_checked_naming_the_datum_and_the_input(api):
    run = Run(api)
    loss_id = _loss_id(api, run.session)
    matrix = {**NLL_DATUM, "loss_fn_inputs": {**NLL_DATUM["loss_fn_inputs"],
                                              "weights": {"data": [1.0] * 8, "dtype": "float32", "shape": [4, 2]}}}
    body = {"forward_backward_input": {"data": [NLL_DATUM, matrix], "loss_fn": "custom",
                                       "loss_fn_config": {"loss_id": loss_id}}}
    r = run.post("forward_backward", body)
    assert r.status_code == 400
    assert r.json()["detail"] == ("data[1].loss_fn_inputs.weights has rank 2, but custom loss 'weighted_nll' "
                                  "declared weights with rank 1")
    missing = {**DATUM, "loss_fn_inputs": {"target_tokens": DATUM["loss_fn_inputs"]["target_tokens"]}}
    r = run.post("forward_backward", _custom_fb(loss_id, missing))
    assert r.status_code == 400 and "data[0].loss_fn_inputs.weights is required" in r.json()["detail"]


def test_hostile_graphs_are_refused_at_creation_and_nothing_runs(api, monkeypatch):
    ran = []
    monkeypatch.setattr(engine_custom, "run_custom_loss", lambda *a: ran.append(a))
    run = Run(api)
    for target in ("os.system", "builtins.__import__", "torch.load", "posix.system"):
        body = definition("weighted_nll")
        body["graph"]["nodes"].insert(2, {"op": "call_function", "name": "evil", "target": target, "args": ["id"]})
        r = _create(api, run.session, 5, body)
        assert r.status_code == 400 and r.json()["detail"].startswith("graph.nodes[2] ('evil'): function"), r.text
    assert api.st.store.custom_loss(f"{run.session}:loss:5") is None and ran == []


def test_a_crash_replays_custom_loss_requests_from_their_stored_definition(tmp_path):
    """A custom-loss forward_backward that ran before the crash must run again (from the Store's definition) for
    the optim_step in flight to find its gradients; the replayed run ends where an uninterrupted one does."""
    adam = {"adam_params": {"learning_rate": 0.01}}
    with _app(tmp_path / "reference") as client:
        run = Run(client)
        loss_id = _loss_id(client, run.session)
        want_fb = run.call("forward_backward", **_custom_fb(loss_id))["metrics"]
        want_step = run.call("optim_step", **adam)["metrics"]
        want_logprobs = run.logprobs()
    data = tmp_path / "data"
    with _app(data, restore_point_every_steps=5) as client:  # no restore point before the crash: all from the journal
        client.st = client.app.state.tinkerd
        run = Run(client)
        loss_id = _loss_id(client, run.session)
        assert run.call("forward_backward", **_custom_fb(loss_id))["metrics"] == want_fb
        gate = threading.Event()
        client.st.scheduler.submit(Job(None, "hold", lambda: gate.wait(30) and Outcome()))
        r = run.post("optim_step", adam)
        assert r.status_code == 200, r.text
        in_flight = r.json()["request_id"]
    gate.set()
    with _app(data, restore_point_every_steps=5) as client:
        assert future_result(client, in_flight)["metrics"] == want_step
        run.client = client
        np.testing.assert_array_equal(run.logprobs(), want_logprobs)
