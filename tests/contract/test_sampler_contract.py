"""What every `Sampler` must do next to its engine's `Trainer`: sample from in-memory snapshots and
from adapter folders, keep a snapshot frozen while training goes on, report bad requests as their
own user errors. Only the protocol is used: submit, has_work, step."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from tinkerd.engine.interface import AdapterRef, AdapterSpec, SampleTask
from tinkerd.protocol.types import AdamParams, BadRequest, Datum, ForwardBackwardCall, SamplingParams

BASE = "tiny"
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, stop_at_eos=False)
PROMPT = [3, 5, 7, 9]


def _sample_all(sampler, requests: list[SampleTask]) -> dict:
    for request in requests:
        sampler.submit(request)
    done: dict = {}
    for _ in range(200):
        for request_id, outcome in sampler.step():
            done[request_id] = outcome
        if len(done) == len(requests):
            break
    assert not sampler.has_work()
    return done


def _sample(sampler, ref: AdapterRef, prompt=PROMPT, params=GREEDY, n=1):
    request_id = uuid.uuid4().hex
    outcome = _sample_all(sampler, [SampleTask(request_id, ref, list(prompt), n, params)])[request_id]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _trained(trainer, lr=0.05) -> str:
    """A run pushed hard towards continuing any prompt with token 42."""
    model_id = f"s-{uuid.uuid4().hex[:8]}"
    trainer.create_adapter(model_id, BASE, AdapterSpec(rank=4, seed=1))
    tokens = np.array([3, 5, 7, 9, 42, 42, 42, 42], dtype=np.int64)
    datum = Datum(tokens[:-1], {"target_tokens": tokens[1:], "weights": np.ones(7, np.float32)})
    for _ in range(3):
        trainer.forward_backward(ForwardBackwardCall(model_id, 0, "cross_entropy", {}, False, [datum]))
        trainer.optim_step(model_id, AdamParams(learning_rate=lr))
    return model_id


def test_a_snapshot_samples_its_adapter_and_stays_frozen_while_training_goes_on(engine):
    base = _sample(engine.sampler, AdapterRef(None, BASE))
    model_id = _trained(engine.trainer)
    ref = engine.trainer.snapshot_for_sampler(model_id)
    assert ref.base_model == BASE
    tuned = _sample(engine.sampler, ref)
    assert tuned.sequences[0].tokens != base.sequences[0].tokens
    # the sampled tokens' logprobs are the ones the trainer's forward gives for them, at this version
    tokens = np.array(PROMPT + tuned.sequences[0].tokens, np.int64)
    scored = engine.trainer.forward_backward(ForwardBackwardCall(model_id, 0, "cross_entropy", {}, True, [
        Datum(tokens[:-1], {"target_tokens": tokens[1:], "weights": np.ones(len(tokens) - 1, np.float32)})]))
    np.testing.assert_allclose(scored.outputs[0]["logprobs"][len(PROMPT) - 1:], tuned.sequences[0].logprobs, atol=1e-4)
    engine.trainer.forward_backward(ForwardBackwardCall(
        model_id, 0, "cross_entropy", {}, False,
        [Datum(np.array([3, 5, 7, 9, 11], np.int64), {"target_tokens": np.array([5, 7, 9, 11, 13], np.int64),
                                                       "weights": np.ones(5, np.float32)})]))
    engine.trainer.optim_step(model_id, AdamParams(learning_rate=1.0))
    again = _sample(engine.sampler, ref)
    assert again.sequences[0].tokens == tuned.sequences[0].tokens
    np.testing.assert_array_equal(again.sequences[0].logprobs, tuned.sequences[0].logprobs)


def test_sampler_weights_on_disk_sample_like_the_in_memory_snapshot(engine, tmp_path):
    model_id = _trained(engine.trainer)
    snapshot = _sample(engine.sampler, engine.trainer.snapshot_for_sampler(model_id), n=2,
                       params=SamplingParams(max_tokens=5, temperature=1.0, seed=11, stop_at_eos=False))
    engine.trainer.save_sampler_weights(model_id, tmp_path / "weights")
    on_disk = _sample(engine.sampler, AdapterRef(str(tmp_path / "weights"), BASE), n=2,
                      params=SamplingParams(max_tokens=5, temperature=1.0, seed=11, stop_at_eos=False))
    assert [s.tokens for s in on_disk.sequences] == [s.tokens for s in snapshot.sequences]
    for x, y in zip(on_disk.sequences, snapshot.sequences):
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)


def test_bad_sample_requests_fail_alone_as_user_errors(engine):
    good, empty, unknown = (uuid.uuid4().hex for _ in range(3))
    done = _sample_all(engine.sampler, [
        SampleTask(good, AdapterRef(None, BASE), PROMPT, 1, GREEDY),
        SampleTask(empty, AdapterRef(None, BASE), [], 1, GREEDY),
        SampleTask(unknown, AdapterRef(None, "no-such-model"), PROMPT, 1, GREEDY),
    ])
    assert len(done[good].sequences[0].tokens) == GREEDY.max_tokens
    assert isinstance(done[empty], BadRequest) and "prompt" in str(done[empty])
    assert isinstance(done[unknown], BadRequest) and "not served" in str(done[unknown])
    with pytest.raises(BadRequest, match="not loaded"):
        engine.trainer.snapshot_for_sampler("never-created")
