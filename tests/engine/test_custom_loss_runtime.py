"""Running a parsed custom loss: the same values and gradients as calling the Python function, every allow-listed
name resolves, and graphs that pass the parser but would blow up memory are stopped at the node, before it runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinkerd.engine.interface import AdapterSpec
from tinkerd.engine.losses import custom
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.protocol.custom_loss import FUNCTIONS, METHODS, parse_custom_loss
from tinkerd.protocol.types import BadRequest, Datum, ForwardBackwardCall
from tests.conftest import make_tiny_runtime
from tests.custom_loss_cases import CASES, definition


def test_every_allowed_function_and_method_exists_in_this_torch():
    assert set(custom._FUNCTIONS) == FUNCTIONS
    assert all(hasattr(torch.Tensor, m) for m in METHODS)
    assert not any(m.endswith("_") or m.startswith("__") for m in METHODS)


def _inputs(name, T=6, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name == "dpo":
        chosen = (torch.arange(T) < T // 2).float()
        return [-torch.rand(T, generator=g) * 3, -torch.rand(T, generator=g) * 3, chosen, 1 - chosen,
                torch.tensor(0.3)]
    if name == "weighted_nll":
        return [-torch.rand(T, generator=g) * 3, torch.rand(T, generator=g)]
    return [torch.log_softmax(torch.randn(T, K, generator=g), -1), torch.softmax(torch.randn(T, K, generator=g), -1)]


@pytest.mark.parametrize("name", list(CASES))
def test_the_interpreted_graph_equals_the_python_function(name):
    fn, _ = CASES[name]
    loss = parse_custom_loss(definition(name))
    values = _inputs(name)
    lp_a = values[0].clone().requires_grad_(True)
    lp_b = values[0].clone().requires_grad_(True)
    got, got_metrics = custom.run_custom_loss(loss, [lp_a, *values[1:]])
    want, want_metrics = fn(lp_b, *values[1:])
    got.backward()
    want.backward()
    assert float(got.detach()) == float(want.detach())
    torch.testing.assert_close(lp_a.grad, lp_b.grad, rtol=0, atol=0)
    assert got_metrics == {k: float(v) for k, v in want_metrics.items()}


def _graph(*nodes, inputs=(("logprobs", 1),)):
    """A loss over `inputs` whose body is `nodes` (each (name, op, target, args)); returns the sum of the last."""
    placeholders = [{"op": "placeholder", "name": n, "target": n} for n, _ in inputs]
    body = [{"op": op, "name": name, "target": target, "args": list(args)} for name, op, target, args in nodes]
    last = nodes[-1][0]
    tail = [{"op": "call_method", "name": "total", "target": "sum", "args": [{"ref": last}]},
            {"op": "output", "name": "output", "target": "output", "args": [{"tuple": [{"ref": "total"}, {"dict": {}}]}]}]
    return parse_custom_loss({"name": "probe", "inputs": [{"name": n, "rank": r} for n, r in inputs],
                              "graph": {"nodes": placeholders + body + tail}})


LP = {"ref": "logprobs"}


def test_a_broadcast_beyond_the_bound_is_refused_before_it_runs(monkeypatch):
    outer = _graph(("row", "call_method", "unsqueeze", [LP, 0]), ("col", "call_method", "unsqueeze", [LP, 1]),
                   ("square", "call_function", "operator.mul", [{"ref": "row"}, {"ref": "col"}]))
    small = torch.zeros(64)
    assert float(custom.run_custom_loss(outer, [small])[0]) == 0.0  # 64 x 64 is fine
    calls = []
    monkeypatch.setattr(custom.operator, "mul", lambda *a: calls.append(a))  # would run the product
    monkeypatch.setattr(custom, "_FUNCTIONS", {**custom._FUNCTIONS, "operator.mul": custom.operator.mul})
    with pytest.raises(BadRequest, match=r"node 'square'.*broadcasting to shape \(4096, 4096\)"):
        custom.run_custom_loss(outer, [torch.zeros(4096)])
    assert calls == []


def test_indexing_that_would_explode_is_refused_and_so_are_operators_on_lists_and_big_powers():
    index = _graph(("idx", "call_function", "torch.zeros_like", [LP]), ("long", "call_method", "long", [{"ref": "idx"}]),
                   ("picked", "call_function", "operator.getitem", [LP, {"ref": "long"}]))  # T elements: fine
    assert float(custom.run_custom_loss(index, [torch.ones(8)])[0]) == 8.0
    rows = _graph(("r", "call_method", "unsqueeze", [LP, 0]), ("idx", "call_function", "torch.zeros_like", [LP]),
                  ("long", "call_method", "long", [{"ref": "idx"}]),
                  ("wide", "call_function", "operator.getitem", [{"ref": "r"}, {"tuple": [{"ref": "long"}]}]),
                  ("w2", "call_method", "unsqueeze", [{"ref": "wide"}, 0]),
                  ("huge", "call_function", "operator.getitem", [{"ref": "w2"}, {"tuple": [{"ref": "long"}]}]))
    with pytest.raises(BadRequest, match=r"node 'huge'.*indexing would make a tensor"):
        custom.run_custom_loss(rows, [torch.ones(2048)])
    repeat = _graph(("lst", "call_function", "operator.mul", [[0.0], 1 << 20]))
    with pytest.raises(BadRequest, match=r"node 'lst'.*Python operators apply to tensors and numbers only"):
        custom.run_custom_loss(repeat, [torch.ones(4)])
    power = _graph(("big", "call_function", "operator.pow", [10, 1 << 20]))
    with pytest.raises(BadRequest, match=r"node 'big'.*raised to the power"):
        custom.run_custom_loss(power, [torch.ones(4)])


def test_a_wrong_shape_is_a_bad_request_naming_the_node_and_the_loss_must_be_a_scalar():
    mismatch = _graph(("bad", "call_function", "operator.mul", [LP, {"ref": "w"}]),
                      inputs=(("logprobs", 1), ("w", 1)))
    with pytest.raises(BadRequest, match=r"custom loss 'probe', node 'bad': RuntimeError"):
        custom.run_custom_loss(mismatch, [torch.ones(4), torch.ones(5)])
    d = definition("weighted_nll")
    d["graph"]["nodes"][-1]["args"][0]["tuple"][0] = {"ref": "logprobs"}  # returns the [T] logprobs as the loss
    with pytest.raises(BadRequest, match=r"the loss must be a scalar floating-point tensor, got \(4,\)"):
        custom.run_custom_loss(parse_custom_loss(d), [torch.ones(4), torch.ones(4)])


def test_a_graph_that_fails_on_its_data_fails_alone_before_the_batch_runs():
    trainer = LocalTrainer({"tiny": make_tiny_runtime()})
    for model in ("a", "b"):
        trainer.create_adapter(model, "tiny", AdapterSpec(rank=4, seed=0))
    tokens = np.arange(3, 9, dtype=np.int64)
    good = ForwardBackwardCall("a", 1, "cross_entropy", {}, False, [
        Datum(tokens[:-1], {"target_tokens": tokens[1:], "weights": np.ones(5, np.float32)})])
    bad_loss = _graph(("bad", "call_function", "operator.mul", [LP, {"ref": "w"}]), inputs=(("logprobs", 1), ("w", 1)))
    bad = ForwardBackwardCall("b", 1, "custom", {"loss_id": "x"}, False, [
        Datum(tokens[:-1], {"target_tokens": tokens[1:], "w": np.ones(7, np.float32)})], custom_loss=bad_loss)
    results = trainer.forward_backward_many([good, bad])
    assert isinstance(results[1], BadRequest) and "data[0]: custom loss 'probe', node 'bad'" in str(results[1])
    assert results[0].metrics["loss:sum"] > 0
    assert all(p.grad is None for p in trainer.runtimes["tiny"].lora.parameters("b"))
    assert any(p.grad is not None for p in trainer.runtimes["tiny"].lora.parameters("a"))
