"""The backend's fence against a counting fake trainer: seq_ids strictly increase per model, repeats
get the cached outcome without running again, reordered or stale-epoch operations never run."""

import pytest

from tinkerd.backends.fencing import FencedTrainer, OutOfOrder, StaleEpoch
from tinkerd.engine.interface import ordered_op
from tinkerd.protocol.types import AdamParams, BadRequest, ForwardBackwardCall, ForwardBackwardResult


class CountingTrainer:
    """Records every call that reached it; optim_step returns the running step count per model."""

    def __init__(self):
        self.ran: list[tuple] = []
        self.steps: dict[str, int] = {}

    def optim_step(self, model_id, params):
        self.ran.append(("optim_step", model_id))
        if params.learning_rate > 1:
            raise BadRequest("learning rate too large")
        self.steps[model_id] = self.steps.get(model_id, 0) + 1
        return {"step": self.steps[model_id]}

    def save_state(self, model_id, directory, with_gradients=False):
        self.ran.append(("save_state", model_id))

    def drop_adapter(self, model_id):
        self.ran.append(("drop_adapter", model_id))

    def forward_backward_many(self, calls):
        self.ran.append(("forward_backward_many", [(c.model_id, c.seq_id) for c in calls]))
        return [ForwardBackwardResult([], {"seq": float(c.seq_id)}) for c in calls]


def _call(model_id, seq_id):
    return ForwardBackwardCall(model_id, seq_id, "cross_entropy", {}, False, [])


def test_a_repeated_operation_returns_its_cached_result_without_running_again():
    inner = CountingTrainer()
    trainer = FencedTrainer(inner)
    with ordered_op("a", 2):
        first = trainer.optim_step("a", AdamParams())
    with ordered_op("a", 2):
        again = trainer.optim_step("a", AdamParams())
    assert first == again == {"step": 1} and inner.ran == [("optim_step", "a")]
    with ordered_op("a", 1):  # older and never seen: refused, not run
        with pytest.raises(OutOfOrder, match="seq_id 1 of model 'a' arrived after seq_id 2"):
            trainer.optim_step("a", AdamParams())
    with ordered_op("a", 5):  # gaps are fine (some ordered requests never reach the engine)
        assert trainer.optim_step("a", AdamParams()) == {"step": 2}
    with ordered_op("b", 1):  # models are fenced independently
        assert trainer.optim_step("b", AdamParams()) == {"step": 1}


def test_a_failed_operation_is_consumed_and_its_retry_gets_the_same_error():
    inner = CountingTrainer()
    trainer = FencedTrainer(inner)
    for _ in range(2):
        with ordered_op("a", 1), pytest.raises(BadRequest, match="too large"):
            trainer.optim_step("a", AdamParams(learning_rate=2.0))
    assert inner.ran == [("optim_step", "a")]


def test_one_operation_may_call_several_methods_but_each_only_once():
    inner = CountingTrainer()
    trainer = FencedTrainer(inner)
    with ordered_op("a", 1):
        trainer.optim_step("a", AdamParams())
        trainer.save_state("a", "/nowhere")
        trainer.save_state("a", "/nowhere")
    assert inner.ran == [("optim_step", "a"), ("save_state", "a")]


def test_forward_batches_run_fresh_calls_together_and_answer_repeats_from_the_cache():
    inner = CountingTrainer()
    trainer = FencedTrainer(inner)
    assert [r.metrics["seq"] for r in trainer.forward_backward_many([_call("a", 1), _call("b", 1)])] == [1.0, 1.0]
    results = trainer.forward_backward_many([_call("a", 1), _call("b", 2), _call("a", 0)])  # repeat, fresh, no seq
    assert results[0].metrics == {"seq": 1.0} and results[1].metrics == {"seq": 2.0}
    stale = trainer.forward_backward_many([_call("b", 1)])[0]  # b 1 is cached: same result, not an error
    assert stale.metrics == {"seq": 1.0}
    assert inner.ran == [("forward_backward_many", [("a", 1), ("b", 1)]),
                         ("forward_backward_many", [("b", 2), ("a", 0)])]


def test_a_newer_claim_fences_off_the_older_caller_before_anything_runs():
    inner = CountingTrainer()
    trainer = FencedTrainer(inner)
    old = trainer.fence.claim()
    new = trainer.fence.claim()
    with pytest.raises(StaleEpoch, match=f"epoch {old} is stale"):
        trainer.call(old, ("a", 1), "optim_step", "a", AdamParams())
    with pytest.raises(StaleEpoch):
        trainer.call(old, None, "forward_backward_many", [_call("a", 1)])
    assert inner.ran == []
    assert trainer.call(new, ("a", 1), "optim_step", "a", AdamParams()) == {"step": 1}


def test_dropping_a_model_forgets_its_sequence():
    inner = CountingTrainer()
    trainer = FencedTrainer(inner)
    with ordered_op("a", 3):
        trainer.optim_step("a", AdamParams())
    trainer.drop_adapter("a")
    assert trainer.status()["last_applied"] == {}
    with ordered_op("a", 1):  # a run re-created under the same id starts over
        assert trainer.optim_step("a", AdamParams()) == {"step": 2}


def test_a_caller_ahead_of_the_fence_learns_that_the_backend_restarted():
    from tinkerd.backends.fencing import Restarted

    trainer = FencedTrainer(CountingTrainer())  # a fresh backend: epoch 0
    with pytest.raises(Restarted, match="restarted"):
        trainer.call(3, ("a", 1), "optim_step", "a", AdamParams())
