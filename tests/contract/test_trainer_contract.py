"""What every `Trainer` must do, whatever runs it (tests.contract.implementations lists the engines).

References are computed another way: a fresh adapter (LoRA B = 0) must give the plain Hugging Face
model's logprobs, computed in this process; identical states fed identical data must stay
bit-identical; a loaded state must continue exactly like the saved one.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

from tinkerd.engine.interface import ordered_op
from tinkerd.engine.interface import AdapterSpec
from tinkerd.protocol.types import AdamParams, BadRequest, Datum, ForwardBackwardCall
from tests.conftest import make_tiny_model
from tests.contract.implementations import TINY_SEED

BASE = "tiny"
SPEC = AdapterSpec(rank=4, seed=3)
STEP = AdamParams(learning_rate=5e-2)


def _new_id(tag: str = "m") -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def _datum(tokens, weights=None) -> Datum:
    tokens = np.asarray(tokens, dtype=np.int64)
    weights = np.ones(len(tokens) - 1, dtype=np.float32) if weights is None else np.asarray(weights, np.float32)
    return Datum(tokens[:-1], {"target_tokens": tokens[1:], "weights": weights})


DATA = [_datum([3, 5, 7, 9, 11, 13]), _datum([4, 6, 8, 10], [1.0, 0.5, 2.0])]


def _call(model_id, data=DATA, forward_only=False, seq_id=0) -> ForwardBackwardCall:
    return ForwardBackwardCall(model_id, seq_id, "cross_entropy", {}, forward_only, data)


def _logprobs(trainer, model_id, data=DATA) -> list[np.ndarray]:
    return [o["logprobs"] for o in trainer.forward_backward(_call(model_id, data, forward_only=True)).outputs]


def _created(trainer, spec=SPEC, tag="m") -> str:
    model_id = _new_id(tag)
    trainer.create_adapter(model_id, BASE, spec)
    return model_id


def _train(trainer, model_id, steps=1):
    for _ in range(steps):
        trainer.forward_backward(_call(model_id))
        trainer.optim_step(model_id, STEP)


def test_serves_the_tiny_base_model(engine):
    (info,) = engine.trainer.base_models()
    assert info.name == BASE and info.max_context_length == 64 and info.max_lora_rank >= SPEC.rank


def test_a_fresh_adapter_gives_the_base_models_logprobs_computed_in_process(engine):
    model_id = _created(engine.trainer)
    result = engine.trainer.forward_backward(_call(model_id, forward_only=True))
    reference = make_tiny_model(TINY_SEED).eval()
    expected_loss = 0.0
    for datum, output in zip(DATA, result.outputs):
        with torch.no_grad():
            logp = reference(torch.from_numpy(datum.tokens)[None]).logits[0].float().log_softmax(-1)
        lp = logp.gather(-1, torch.from_numpy(datum.loss_inputs["target_tokens"])[:, None])[:, 0].numpy()
        np.testing.assert_allclose(output["logprobs"], lp, atol=1e-5)
        expected_loss -= float((datum.loss_inputs["weights"] * lp).sum())
    assert result.metrics["loss:sum"] == pytest.approx(expected_loss, abs=1e-4)


def test_create_and_drop_are_idempotent(engine):
    trainer = engine.trainer
    model_id = _created(trainer)
    _train(trainer, model_id)
    trained = _logprobs(trainer, model_id)
    trainer.create_adapter(model_id, BASE, SPEC)  # again: keeps the trained weights
    for a, b in zip(trained, _logprobs(trainer, model_id)):
        np.testing.assert_array_equal(a, b)
    trainer.drop_adapter(model_id)
    trainer.drop_adapter(model_id)
    with pytest.raises(BadRequest, match="not loaded"):
        trainer.forward_backward(_call(model_id))


def test_the_same_step_from_identical_states_gives_identical_results(engine):
    trainer = engine.trainer
    a, b = _created(trainer, tag="a"), _created(trainer, tag="b")  # same seed: same initial weights
    together = trainer.forward_backward_many([_call(a), _call(b)])
    assert together[0].metrics == together[1].metrics
    for x, y in zip(together[0].outputs, together[1].outputs):
        np.testing.assert_array_equal(x["logprobs"], y["logprobs"])
    assert trainer.optim_step(a, STEP) == trainer.optim_step(b, STEP)
    for x, y in zip(_logprobs(trainer, a), _logprobs(trainer, b)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(_logprobs(trainer, a)[0], together[0].outputs[0]["logprobs"])  # the step did something


def test_one_tenants_optim_step_leaves_the_others_bit_identical(engine):
    trainer = engine.trainer
    tenants = [_created(trainer, AdapterSpec(rank=4, seed=s), tag=f"t{s}") for s in range(3)]
    for t in tenants:
        _train(trainer, t)
    before = {t: _logprobs(trainer, t) for t in tenants[1:]}
    trainer.forward_backward_many([_call(t) for t in tenants])  # every tenant accumulates gradients...
    trainer.optim_step(tenants[0], AdamParams(learning_rate=0.5))  # ...and only the first one steps
    for t in tenants[1:]:
        for x, y in zip(before[t], _logprobs(trainer, t)):
            np.testing.assert_array_equal(x, y)


def test_save_state_then_load_state_continues_exactly(engine, tmp_path):
    trainer = engine.trainer
    original = _created(trainer)
    _train(trainer, original, steps=2)
    trainer.save_state(original, tmp_path / "state")
    restored = _new_id("restored")
    spec = trainer.load_state(restored, BASE, tmp_path / "state", True)
    assert spec.rank == SPEC.rank
    for x, y in zip(_logprobs(trainer, original), _logprobs(trainer, restored)):
        np.testing.assert_array_equal(x, y)
    _train(trainer, original)
    _train(trainer, restored)  # the AdamW moments came along: the next step is the same step
    for x, y in zip(_logprobs(trainer, original), _logprobs(trainer, restored)):
        np.testing.assert_array_equal(x, y)


def test_bad_requests_are_user_errors_and_fail_alone(engine):
    trainer = engine.trainer
    model_id = _created(trainer)
    bad = _call(model_id, [_datum([3, 5, 999])])
    good, wrong = trainer.forward_backward_many([_call(model_id), bad])
    assert isinstance(wrong, BadRequest) and "token id 999 is outside the vocabulary" in str(wrong)
    assert good.metrics["loss:sum"] > 0
    with pytest.raises(BadRequest, match="rank"):
        trainer.create_adapter(_new_id(), BASE, AdapterSpec(rank=0))
    with pytest.raises(BadRequest, match="not served"):
        trainer.create_adapter(_new_id(), "no-such-model", SPEC)
    with pytest.raises(BadRequest, match="not loaded"):
        trainer.optim_step(_new_id("missing"), STEP)


def test_a_repeated_operation_is_answered_from_the_fence_and_applied_once(engine):
    trainer = engine.trainer
    once, twice = _created(trainer, tag="once"), _created(trainer, tag="twice")
    for model_id, repeats in ((once, 1), (twice, 2)):
        for _ in range(repeats):  # a retried request: same model, same seq_id
            first = trainer.forward_backward(_call(model_id, seq_id=1))
            with ordered_op(model_id, 2):
                metrics = trainer.optim_step(model_id, STEP)
    assert first.metrics["loss:sum"] > 0 and metrics["grad_norm:mean"] > 0
    for x, y in zip(_logprobs(trainer, once), _logprobs(trainer, twice)):
        np.testing.assert_array_equal(x, y)
