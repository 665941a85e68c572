"""The official tinker SDK, unmodified, against a real tinkerd process serving the embedded model."""

from __future__ import annotations

import math

import httpx
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import EMBEDDED, ServerProcess, sft_datum

pytestmark = pytest.mark.slow


def test_sft_steps_lower_the_loss_and_the_new_weights_sample(server):
    service = tinker.ServiceClient(base_url=server.url, api_key="tml-e2e")
    training = service.create_lora_training_client(base_model=EMBEDDED, rank=8, seed=0).result()
    tokenizer = training.get_tokenizer()  # offline, from the hub cache tinkerd filled
    assert training.get_info().model_data.model_name == EMBEDDED
    datum = sft_datum(tokenizer, "What is the capital of Plorbia?", "The capital of Plorbia is Vemsk.")

    losses = []
    for _ in range(5):
        fwd = training.forward_backward([datum], "cross_entropy")
        opt = training.optim_step(types.AdamParams(learning_rate=1e-3))
        losses.append(fwd.result().metrics["loss:sum"])
        opt.result()
    assert losses[-1] < 0.5 * losses[0], losses

    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Plorbia?"}], add_generation_prompt=True,
        tokenize=True, return_dict=False))
    result = sampler.sample(prompt, num_samples=2, sampling_params=types.SamplingParams(
        max_tokens=20, temperature=0.0, stop=["<|im_end|>"])).result()
    assert len(result.sequences) == 2
    for seq in result.sequences:
        assert seq.tokens and len(seq.logprobs) == len(seq.tokens)
        assert all(lp <= 0 for lp in seq.logprobs)
    assert "Vemsk" in tokenizer.decode(result.sequences[0].tokens)

    # The sampler's logprobs are the trainer's logprobs for the same tokens (the same compute dtype on both sides).
    tokens = prompt.to_ints() + result.sequences[0].tokens
    forward = training.forward([types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
        "target_tokens": tokens[1:], "weights": [0.0] * (len(tokens) - 1)})], "cross_entropy").result()
    trained_lp = forward.loss_fn_outputs[0]["logprobs"].tolist()[prompt.length - 1:]
    assert max(abs(a - b) for a, b in zip(trained_lp, result.sequences[0].logprobs)) < 0.1

    prompt_lp = sampler.compute_logprobs(prompt).result()
    assert prompt_lp[0] is None and len(prompt_lp) == prompt.length and all(not math.isnan(x) for x in prompt_lp[1:])

    path = training.save_weights_for_sampler("plorbia").result().path
    assert path.endswith("/sampler_weights/plorbia")
    named = service.create_sampling_client(model_path=path).result()
    again = named.sample(prompt, 1, types.SamplingParams(max_tokens=20, temperature=0.0, stop=["<|im_end|>"])).result()
    assert again.sequences[0].tokens == result.sequences[0].tokens
    assert named.get_tokenizer() is not None


def test_wrong_api_key_is_refused_when_keys_are_configured(tmp_path):
    server = ServerProcess(tmp_path / "keyed", "--api-key", "tml-right-key")
    try:
        r = httpx.post(f"{server.url}/api/v1/create_session", json={}, headers={"X-API-Key": "tml-wrong"})
        assert r.status_code == 401 and r.json()["detail"]
        with pytest.raises(tinker.AuthenticationError):
            tinker.ServiceClient(base_url=server.url, api_key="tml-wrong").create_lora_training_client(
                base_model=EMBEDDED, rank=4).result()
        with tinker.ServiceClient(base_url=server.url, api_key="tml-right-key") as ok:  # closed before the stop
            assert ok.create_sampling_client(base_model=EMBEDDED).result() is not None
    finally:
        server.stop()


def test_prompt_scoring_options_reach_the_sdk(server):
    """prompt_logprobs_last_n, target_prompt_logprobs (dense and sparse), prompt_alt_tokens_k and
    topk_sample_logprobs through the SDK's own parsing and checks."""
    service = tinker.ServiceClient(base_url=server.url, api_key="tml-e2e")
    sampler = service.create_sampling_client(base_model=EMBEDDED).result()
    tokens = sampler.get_tokenizer().encode("The quick brown fox jumps over the lazy dog")
    prompt = types.ModelInput.from_ints(tokens)
    n = len(tokens)
    full = sampler.compute_logprobs(prompt).result()
    dense = types.TensorData(data=[tokens[i + 1] for i in range(n - 1)], dtype="int64", shape=[n - 1, 1])
    out = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=3, seed=1), include_prompt_logprobs=True,
                         topk_prompt_logprobs=2, prompt_logprobs_last_n=2, target_prompt_logprobs=dense,
                         prompt_alt_tokens_k=3, topk_sample_logprobs=4).result()
    assert out.prompt_logprobs[: n - 2] == [None] * (n - 2)
    assert out.prompt_logprobs[-2:] == pytest.approx(full[-2:], abs=1e-4)
    assert out.target_prompt_logprobs.to_numpy()[:, 0].tolist() == pytest.approx(full[1:], abs=1e-4)
    assert out.prompt_alt_tokens.tokens.to_numpy().shape == (n - 1, 3)
    assert out.sequences[0].topk_logprobs is not None and len(out.sequences[0].topk_logprobs) == 3
    # A sparse request (one cell: the last position's actual token) is answered in the same layout.
    sparse = types.TensorData(data=[tokens[-1]], dtype="int64", shape=[n - 1, 2],
                              sparse_crow_indices=[0] * (n - 1) + [1], sparse_col_indices=[1])
    answer = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=1), target_prompt_logprobs=sparse).result()
    scored = answer.target_prompt_logprobs
    assert scored.sparse_crow_indices is not None and scored.to_numpy()[-1, 1] == pytest.approx(full[-1], abs=1e-4)


def test_an_inflight_client_follows_later_inflight_saves_and_a_snapshot_client_does_not(server):
    """`save_weights_and_get_sampling_client(kind="inflight")` with the official SDK: a client made before
    two more training steps scores a sequence as the weights after them do (docs/inflight.md)."""
    service = tinker.ServiceClient(base_url=server.url, api_key="tml-inflight")
    training = service.create_lora_training_client(base_model=EMBEDDED, rank=4, seed=0).result()
    datum = sft_datum(training.get_tokenizer(), "Name a colour.", "Teal.")
    sequence = types.ModelInput.from_ints(datum.model_input.to_ints())
    inflight = training.save_weights_and_get_sampling_client(kind="inflight").result()
    snapshot = training.save_weights_and_get_sampling_client().result()
    before = inflight.compute_logprobs(sequence).result()[1:]
    for _ in range(2):
        training.forward_backward([datum], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    newer = training.save_weights_and_get_sampling_client(kind="inflight").result()
    old_client, new_client = (c.compute_logprobs(sequence).result()[1:] for c in (inflight, newer))
    assert max(abs(a - b) for a, b in zip(old_client, new_client)) < 1e-5
    assert max(abs(a - b) for a, b in zip(old_client, before)) > 1e-3
    assert max(abs(a - b) for a, b in zip(snapshot.compute_logprobs(sequence).result()[1:], before)) < 1e-5
