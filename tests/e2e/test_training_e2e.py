"""Training through the real SDK: DPO with forward_backward_custom, state across a restart, bad input."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tinker
import torch
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from tests.e2e.conftest import EMBEDDED, ServerProcess

pytestmark = pytest.mark.slow


def _datum(tokens: list[int], prompt_len: int) -> types.Datum:
    weights = [0.0] * (prompt_len - 1) + [1.0] * (len(tokens) - prompt_len)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights})


def _pair_data(tokenizer):
    data = []
    for question, chosen, rejected in [("Name a colour.", "Teal.", "I refuse."),
                                       ("Say hello.", "Hello!", "No.")]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        for answer in (chosen, rejected):
            full = prompt + tokenizer.encode(answer) + [tokenizer.eos_token_id]
            data.append(_datum(full, len(prompt)))
    return data  # chosen, rejected, chosen, rejected


def _sequence_logprob(logprobs, datum):
    weights = torch.tensor(datum.loss_fn_inputs["weights"].tolist())
    return (logprobs * weights).sum()


def test_dpo_with_forward_backward_custom_lowers_the_dpo_loss(server):
    training = tinker.ServiceClient(base_url=server.url, api_key="tml-dpo").create_lora_training_client(
        base_model=EMBEDDED, rank=8, seed=0).result()
    data = _pair_data(training.get_tokenizer())
    reference = [_sequence_logprob(torch.tensor(o["logprobs"].tolist()), d)
                 for o, d in zip(training.forward(data, "cross_entropy").result().loss_fn_outputs, data)]
    beta = 0.5

    def dpo_loss(batch, logprobs_list):
        seq = [_sequence_logprob(lp, d) - ref for lp, d, ref in zip(logprobs_list, batch, reference)]
        margins = torch.stack([seq[i] - seq[i + 1] for i in range(0, len(seq), 2)])
        loss = -torch.nn.functional.logsigmoid(beta * margins).sum()
        return loss, {"dpo_loss:sum": float(loss.detach())}

    losses = []
    for _ in range(4):
        out = training.forward_backward_custom(data, dpo_loss).result()
        losses.append(out.metrics["dpo_loss:sum"])
        training.optim_step(types.AdamParams(learning_rate=5e-4)).result()
    assert losses[0] == pytest.approx(2 * np.log(2), abs=1e-3)  # a fresh adapter equals the reference
    assert losses[-1] < 0.7 * losses[0], losses


def _gap_waiting_request(url: str, model_id: str, datum: types.Datum) -> str:
    """A forward_backward whose seq_id leaves a gap, so it stays in flight until the server dies."""
    request = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(
        data=[datum], loss_fn="cross_entropy"), model_id=model_id, seq_id=10_000)
    r = httpx.post(f"{url}/api/v1/forward_backward", content=forward_backward_request_to_proto(request).SerializeToString(),
                   headers={"X-API-Key": "tml-state", "Content-Type": "application/x-protobuf"})
    return r.json()["request_id"]


def test_state_survives_kill_9_bit_exactly(tmp_path):
    """Without the request journal (--restore-point-every 0), a kill -9 loses the unsaved state: resume from save_state."""
    data_dir = tmp_path / "data"
    first = ServerProcess(data_dir, "--restore-point-every", "0")
    try:
        crashed = tinker.ServiceClient(base_url=first.url, api_key="tml-state")
        training = crashed.create_lora_training_client(base_model=EMBEDDED, rank=4, seed=1).result()
        tokenizer = training.get_tokenizer()
        tokens = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
        datum = _datum(tokens, 1)
        adam = types.AdamParams(learning_rate=1e-3)
        for _ in range(2):
            training.forward_backward([datum], "cross_entropy").result()
            training.optim_step(adam).result()
        path = training.save_state("resume-me").result().path
        saved = training.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
        training.forward_backward([datum], "cross_entropy").result()
        training.optim_step(adam).result()
        after_step = training.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
        in_flight = _gap_waiting_request(first.url, training.model_id, datum)
    finally:
        first.kill()  # SIGKILL: no shutdown code runs

    # On the same port, so the first client's session (its heartbeat) reaches the restarted server, and both
    # clients are closed before it stops: a client left open would heartbeat against nothing for the whole run.
    second = ServerProcess(data_dir, "--restore-point-every", "0", port=first.port)
    try:
        with crashed, tinker.ServiceClient(base_url=second.url, api_key="tml-state") as service:
            lost = httpx.post(f"{second.url}/api/v1/retrieve_future", json={"request_id": in_flight},
                              headers={"X-API-Key": "tml-state"}, timeout=10).json()
            assert lost["category"] == "server" and "restarted" in lost["error"]
            runs = tinker.RestClient(base_url=second.url, api_key="tml-state").list_training_runs().result()
            assert training.model_id in [run.training_run_id for run in runs.training_runs]
            resumed = service.create_training_client_from_state_with_optimizer(path).result()
            assert resumed.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist() == saved
            resumed.forward_backward([datum], "cross_entropy").result()
            resumed.optim_step(adam).result()
            assert resumed.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist() == \
                after_step
            sampler = service.create_sampling_client(model_path=path).result()  # a weights checkpoint samples too
            assert sampler.sample(types.ModelInput.from_ints(tokens[:3]), 1,
                                  types.SamplingParams(max_tokens=3)).result()
    finally:
        second.stop()


def test_a_graceful_restart_keeps_unsaved_training_state_and_the_same_sdk_client_carries_on(tmp_path):
    data_dir = tmp_path / "data"
    first = ServerProcess(data_dir, "--dtype", "fp32", park_on_exit=True)
    try:
        service = tinker.ServiceClient(base_url=first.url, api_key="tml-park")
        clients = [service.create_lora_training_client(base_model=EMBEDDED, rank=4, seed=1).result() for _ in range(2)]
        datum = _datum(clients[0].get_tokenizer().encode("Parked runs wake up where they stopped."), 1)
        adam = types.AdamParams(learning_rate=1e-3)
        for client in clients:  # one after the other: the same batches, the same numbers
            for step in range(2):
                client.forward_backward([datum], "cross_entropy").result()
                if step == 0 or client is clients[0]:
                    client.optim_step(adam).result()
        expected = clients[0].forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
        training = clients[1]  # one optim_step short, its gradients accumulated and unsaved
    finally:
        first.stop()  # SIGTERM
    second = ServerProcess(data_dir, "--dtype", "fp32", park_on_exit=True, port=first.port)
    try:
        with service:  # closed before the stop
            training.optim_step(adam).result()  # the same SDK client, its next seq_id
            got = training.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
            assert np.allclose(got, expected, atol=1e-6, rtol=0)
            assert "resume on their next request" in second.log_tail(100000)
    finally:
        second.stop()


def test_bad_input_is_named_and_other_tenants_are_unaffected(server):
    service = tinker.ServiceClient(base_url=server.url, api_key="tml-bad")
    bad_client = service.create_lora_training_client(base_model=EMBEDDED, rank=4).result()
    good_client = service.create_lora_training_client(base_model=EMBEDDED, rank=4).result()
    good = _datum([1, 2, 3, 4, 5], 1)
    cases = [
        ([_datum([1, 2, 10**6], 1)], "cross_entropy", "outside the vocabulary"),
        ([types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                      loss_fn_inputs={"target_tokens": [2, 3], "weights": [1.0, 1.0, 1.0]})], "cross_entropy",
         r"target_tokens.*shape \(2,\)"),
        ([types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                      loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, float("nan"), 1.0]})],
         "cross_entropy", "NaN"),
        ([good], "no_such_loss", "known losses"),
    ]
    for data, loss_fn, message in cases:  # refused at submit (400) or as the request's failure, naming the field
        with pytest.raises((tinker.RequestFailedError, tinker.BadRequestError), match=message):
            bad_client.forward_backward(data, loss_fn).result()
        good_client.forward_backward([good], "cross_entropy").result()
    with pytest.raises((tinker.RequestFailedError, tinker.BadRequestError), match="rank"):
        service.create_lora_training_client(base_model=EMBEDDED, rank=0).result()
    assert good_client.optim_step(types.AdamParams(learning_rate=1e-4)).result().metrics["grad_norm:mean"] > 0
