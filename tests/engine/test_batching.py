"""Multi-tenant batches and micro-batching give exactly what each request gets alone, in one batch."""

import numpy as np
import pytest
import torch

from tinkerd.engine.batching import Row, merge_metrics, plan_micro_batches
from tinkerd.engine.interface import AdapterSpec
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.protocol.types import BadRequest, Datum, ForwardBackwardCall
from tests.conftest import make_tiny_runtime


def _datum(rng, length):
    tokens = rng.integers(2, 120, size=length + 1)
    return Datum(tokens[:-1].astype(np.int64), {"target_tokens": tokens[1:].astype(np.int64),
                                               "weights": rng.normal(size=length).astype(np.float32)})


def _trainer(budget=None, ranks=(4, 8)):
    trainer = LocalTrainer({"tiny": make_tiny_runtime()}, token_budget_override=budget)
    for i, rank in enumerate(ranks):
        trainer.create_adapter(f"m{i}", "tiny", AdapterSpec(rank=rank, seed=i))
        for name, p in trainer.runtimes["tiny"].lora.named_parameters(f"m{i}"):
            if name.endswith("lora_B"):
                p.data.normal_(std=0.05, generator=torch.Generator().manual_seed(10 + i))
    return trainer


def _grads(trainer, model_id):
    return [p.grad.clone() for p in trainer.runtimes["tiny"].lora.parameters(model_id)]


def _calls(seed=0):
    rng = np.random.default_rng(seed)
    return [ForwardBackwardCall("m0", 1, "cross_entropy", {}, False, [_datum(rng, 7), _datum(rng, 3)]),
            ForwardBackwardCall("m1", 1, "cross_entropy", {}, False, [_datum(rng, 5)])]


def test_two_tenants_in_one_batch_get_the_gradients_each_gets_alone():
    calls = _calls()
    alone = _trainer()
    alone_results = [alone.forward_backward(c) for c in calls]
    together = _trainer()
    together_results = together.forward_backward_many(calls)
    for model_id in ("m0", "m1"):
        for a, b in zip(_grads(alone, model_id), _grads(together, model_id)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for a, b in zip(alone_results, together_results):
        assert a.metrics["loss:sum"] == pytest.approx(b.metrics["loss:sum"], abs=1e-5)
        for oa, ob in zip(a.outputs, b.outputs):
            np.testing.assert_allclose(oa["logprobs"], ob["logprobs"], atol=1e-6)


def test_micro_batches_sum_to_the_whole_batch():
    calls = _calls(1)
    whole = _trainer()
    whole_results = whole.forward_backward_many(calls)
    split = _trainer(budget=7)  # forces one row per micro-batch
    split_results = split.forward_backward_many(calls)
    for model_id in ("m0", "m1"):
        for a, b in zip(_grads(whole, model_id), _grads(split, model_id)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert [r.metrics["loss:sum"] for r in whole_results] == pytest.approx(
        [r.metrics["loss:sum"] for r in split_results], abs=1e-5)


def test_a_bad_request_fails_alone():
    calls = _calls()
    calls[0].data[0].loss_inputs["weights"] = np.ones(2, dtype=np.float32)
    trainer = _trainer()
    results = trainer.forward_backward_many(calls)
    assert isinstance(results[0], BadRequest) and "data[0].loss_fn_inputs.weights" in str(results[0])
    assert results[1].metrics["loss:sum"] != 0
    assert all(p.grad is None for p in trainer.runtimes["tiny"].lora.parameters("m0"))


def test_nan_advantages_and_out_of_context_are_named():
    trainer = _trainer()
    rng = np.random.default_rng(0)
    long = _datum(rng, 70)  # the tiny model's context is 64
    with pytest.raises(BadRequest, match=r"data\[0\]\.model_input has 70 tokens; the model's context is 64"):
        trainer.forward_backward(ForwardBackwardCall("m0", 1, "cross_entropy", {}, False, [long]))
    bad = _datum(rng, 4)
    bad.loss_inputs["weights"][1] = np.nan
    with pytest.raises(BadRequest, match="weights contains NaN"):
        trainer.forward_backward(ForwardBackwardCall("m0", 1, "cross_entropy", {}, False, [bad]))


def test_plan_respects_the_budget_and_keeps_every_row():
    rows = [Row(0, i, "a", Datum(np.zeros(n, dtype=np.int64), {})) for i, n in enumerate([5, 9, 2, 9, 4, 1])]
    chunks = plan_micro_batches(rows, budget=18)
    assert sorted(r.index for c in chunks for r in c) == list(range(6))
    assert all(len(c) * max(r.length for r in c) <= 18 for c in chunks)


def test_merge_metrics_by_reduction():
    merged = merge_metrics([({"a:sum": 1.0, "b:mean": 0.5, "c:max": 3.0}, 1.0),
                            ({"a:sum": 2.0, "b:mean": 1.0, "c:max": 2.0}, 3.0)])
    assert merged == {"a:sum": 3.0, "b:mean": pytest.approx(0.875), "c:max": 3.0}


def test_the_token_budget_is_a_power_of_two_that_stays_put_as_free_memory_moves(monkeypatch):
    from types import SimpleNamespace

    from tinkerd.engine import batching

    config = SimpleNamespace(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, vocab_size=49152)
    budgets = []
    for gib in (12, 16, 20, 22):  # free memory moving by almost a factor of 2
        monkeypatch.setattr(batching, "available_memory_bytes", lambda device, gib=gib: int(gib * (1 << 30)))
        budgets.append(batching.token_budget(config, torch.device("cpu"), 4))
    assert len(set(budgets)) == 1 and budgets[0] & (budgets[0] - 1) == 0 and budgets[0] > batching.TOKEN_BUDGET_FLOOR
