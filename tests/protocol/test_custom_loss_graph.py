"""Parsing a custom loss graph as data: what the SDK sends is accepted; hostile or malformed graphs are refused
with a BadRequest naming the node, by the parser alone (it imports no torch and calls nothing)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from tinkerd.protocol.custom_loss import MAX_NODES, check_datums, parse_custom_loss
from tinkerd.protocol.types import BadRequest, Datum
from tests.custom_loss_cases import CASES, definition


@pytest.mark.parametrize("name", list(CASES))
def test_what_the_sdk_traces_is_accepted(name):
    loss = parse_custom_loss(definition(name))
    assert loss.inputs[0][0] == "logprobs" and loss.nodes[-1].op == "output"
    assert parse_custom_loss(loss.definition) == loss  # what the Store keeps parses to the same loss


def _nll_with(node: dict, at: int = 2) -> dict:
    """weighted_nll with `node` inserted before its output (and used by nothing)."""
    d = definition("weighted_nll")
    d["graph"]["nodes"].insert(at, node)
    return d


def _call(target, *args, op="call_function", name="evil", **kwargs):
    return {"op": op, "name": name, "target": target, "args": list(args), "kwargs": kwargs}


LP = {"ref": "logprobs"}
HOSTILE = {
    "os.system": _call("os.system", "rm -rf /"),
    "__import__": _call("__import__", "os"),
    "builtins.__import__": _call("builtins.__import__", "subprocess"),
    "builtins.eval": _call("builtins.eval", "1"),
    "builtins.open": _call("builtins.open", "/etc/passwd"),
    "torch.load": _call("torch.load", "/tmp/x.pt"),
    "torch.save": _call("torch.save", LP, "/tmp/x.pt"),
    "torch.hub.load": _call("torch.hub.load", "a", "b"),
    "torch.randn": _call("torch.randn", 3),
    "torch.manual_seed": _call("torch.manual_seed", 0),
    "torch.zeros huge": _call("torch.zeros", 1 << 40),
    "torch.ops chain": _call("torch.ops.aten.exp", LP),
    "torch._C._nn other": _call("torch._C._nn.linear", LP, LP),
    "operator.attrgetter": _call("operator.attrgetter", "__globals__"),
    "operator.methodcaller": _call("operator.methodcaller", "__reduce__"),
    "getattr dunder": _call("getattr", LP, "__class__"),
    "getattr grad": _call("getattr", LP, "grad"),
    "getattr of a string": _call("getattr", "os", "system"),
    "getattr three args": _call("getattr", LP, "shape", None),
    "dunder method": _call("__reduce_ex__", LP, 2, op="call_method"),
    "getattribute method": _call("__getattribute__", LP, "data", op="call_method"),
    "in-place method": _call("exp_", LP, op="call_method"),
    "copy_ method": _call("copy_", LP, LP, op="call_method"),
    "numpy method": _call("numpy", LP, op="call_method"),
    "backward method": _call("backward", LP, op="call_method"),
    "register_hook": _call("register_hook", LP, "x", op="call_method"),
    "method on a constant": _call("exp", 3.0, op="call_method"),
    "out= kwarg": _call("torch.exp", LP, out=LP),
    "huge int": _call("torch.sum", LP, 1 << 40),
    "bad dtype": _call("torch.sum", LP, dtype={"dtype": "object"}),
    "call_module": _call("linear", LP, op="call_module"),
    "get_attr": {"op": "get_attr", "name": "evil", "target": "_tensor_constant0", "args": [], "kwargs": {}},
    "unknown op": _call("torch.exp", LP, op="exec"),
    "unknown ref": _call("torch.exp", {"ref": "nowhere"}),
    "self reference (cycle)": _call("torch.exp", {"ref": "evil"}),
    "unknown encoding": _call("torch.exp", {"pickle": "gASVAA=="}),
    "deep nesting": _call("torch.stack", [[[[[[[[LP]]]]]]]]),
    "long string": _call("torch.sum", LP, "x" * 1000),
    "late placeholder": {"op": "placeholder", "name": "evil", "target": "extra", "args": [], "kwargs": {}},
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_nodes_are_refused_naming_the_node(case):
    with pytest.raises(BadRequest) as err:
        parse_custom_loss(_nll_with(copy.deepcopy(HOSTILE[case])))
    assert "graph.nodes[2] ('evil')" in str(err.value) or "placeholders" in str(err.value), str(err.value)


def test_a_later_node_reference_is_refused():
    d = definition("weighted_nll")
    nodes = d["graph"]["nodes"]
    nodes[2]["args"][0] = {"ref": nodes[3]["name"]}  # refers forward: a cycle or an unknown name
    with pytest.raises(BadRequest, match=rf"graph.nodes\[2\] \('{nodes[2]['name']}'\): refers to"):
        parse_custom_loss(d)


def test_duplicate_names_nodes_after_the_output_and_no_output_are_refused():
    d = definition("weighted_nll")
    d["graph"]["nodes"].insert(3, dict(d["graph"]["nodes"][2]))
    with pytest.raises(BadRequest, match=r"graph.nodes\[3\] .*used by an earlier node"):
        parse_custom_loss(d)
    d = definition("weighted_nll")
    d["graph"]["nodes"].append(_call("torch.exp", LP, name="after"))
    with pytest.raises(BadRequest, match=r"'after'\): nodes after the output"):
        parse_custom_loss(d)
    d = definition("weighted_nll")
    d["graph"]["nodes"].pop()
    with pytest.raises(BadRequest, match=r"the last node must be the output"):
        parse_custom_loss(d)


def test_a_million_nodes_are_refused_before_any_is_read():
    d = definition("weighted_nll")
    d["graph"]["nodes"] = [_call("torch.exp", LP)] * 1_000_000
    with pytest.raises(BadRequest, match=rf"1000000 nodes; a custom loss has at most {MAX_NODES}"):
        parse_custom_loss(d)


@pytest.mark.parametrize("output,message", [
    ({"ref": "neg"}, "must be \\(loss, metrics\\)"),
    ({"tuple": [{"ref": "neg"}, {"dict": {"nll:sum": {"ref": "neg"}}}]}, "custom/<name>:sum"),
    ({"tuple": [{"ref": "neg"}, {"dict": {"custom/x:max": {"ref": "neg"}}}]}, "custom/<name>:sum"),
    ({"tuple": [{"ref": "neg"}, {"dict": {"custom/x:sum": 3.0}}]}, "must be a node"),
])
def test_the_output_must_be_a_loss_and_named_metrics(output, message):
    d = definition("weighted_nll")
    d["graph"]["nodes"][-1]["args"] = [output]
    with pytest.raises(BadRequest, match=message):
        parse_custom_loss(d)


@pytest.mark.parametrize("inputs,message", [
    ([{"name": "weights", "rank": 1}, {"name": "logprobs", "rank": 1}], "inputs\\[0\\] must be logprobs"),
    ([{"name": "logprobs", "rank": 0}, {"name": "weights", "rank": 1}], "rank 1"),
    ([{"name": "logprobs", "rank": 1}, {"name": "weights", "rank": 3}], "inputs\\[1\\].rank must be 0, 1 or 2"),
    ([{"name": "logprobs", "rank": 1}, {"name": "Weights!", "rank": 1}], "inputs\\[1\\].name"),
    ([{"name": "logprobs", "rank": 1}, {"name": "other", "rank": 1}], "do not match inputs"),
])
def test_inputs_are_checked(inputs, message):
    d = definition("weighted_nll")
    d["inputs"] = inputs
    with pytest.raises(BadRequest, match=message):
        parse_custom_loss(d)


def _datum(n=4, **inputs):
    return Datum(np.arange(n, dtype=np.int64), {"target_tokens": np.arange(1, n + 1, dtype=np.int64), **inputs})


def test_every_datums_inputs_and_ranks_are_checked_naming_the_datum_and_the_input():
    loss = parse_custom_loss(definition("dpo"))
    ok = dict(ref_logprobs=np.zeros(4, np.float32), chosen_mask=np.ones(4, np.float32),
              rejected_mask=np.zeros(4, np.float32), beta=np.array([0.1], np.float32))  # rank 0 as protobuf sends it
    check_datums(loss, [_datum(**ok), _datum(**ok)])
    with pytest.raises(BadRequest, match=r"data\[1\].loss_fn_inputs.rejected_mask is required by custom loss 'dpo'"):
        check_datums(loss, [_datum(**ok), _datum(**{k: v for k, v in ok.items() if k != "rejected_mask"})])
    with pytest.raises(BadRequest, match=r"data\[1\].loss_fn_inputs.chosen_mask has rank 2, but custom loss 'dpo' "
                                         r"declared chosen_mask with rank 1"):
        check_datums(loss, [_datum(**ok), _datum(**{**ok, "chosen_mask": np.ones((4, 2), np.float32)})])
    with pytest.raises(BadRequest, match=r"data\[0\].loss_fn_inputs.beta has rank 1, .* beta with rank 0"):
        check_datums(loss, [_datum(**{**ok, "beta": np.array([0.1, 0.2], np.float32)})])
    soft = parse_custom_loss(definition("soft_targets"))
    with pytest.raises(BadRequest, match=r"data\[0\].loss_fn_inputs.target_tokens has rank 1, .* logprobs with rank 2"):
        check_datums(soft, [_datum(probs=np.ones((4, 2), np.float32))])
