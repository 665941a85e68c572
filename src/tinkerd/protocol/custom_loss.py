"""Server-side custom losses as plain data: parse and validate a `CreateCustomLossRequest`'s graph.

The SDK (`ServiceClient.create_custom_loss`) traces a per-datum loss `fn(logprobs, *inputs) ->
(loss, {"custom/<name>:sum|mean": tensor})` with torch.fx and sends its nodes as JSON. This module
turns that JSON into a `CustomLoss`, refusing (BadRequest naming the node) anything that is not a
computation on tensors: only `placeholder`, `call_function`, `call_method` and `output` nodes; only
functions of `FUNCTIONS` and tensor methods of `METHODS` (no in-place methods, no I/O, no random
state, no factories that take sizes, no `out=`); `getattr` only for `ATTRIBUTES`; references only to
earlier nodes (so no cycles and no unknown names); bounded node count, constants and argument sizes.
Nothing here executes anything: the engine (`tinkerd.engine.losses.custom`) rebuilds the graph from
these names and also bounds tensor sizes while it runs. Torch-free on purpose (the control plane
parses a loss when it is created and again from the Store after a crash).

Knows the wire encoding of arguments; not torch, not the Store, not how a loss runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from tinkerd.protocol.types import BadRequest, Datum

MAX_NODES = 2048
MAX_INPUTS = 16
MAX_ARG_ITEMS = 8192  # encoded values across the whole graph
MAX_ARG_DEPTH = 6
MAX_INT = 1 << 20  # any integer constant
MAX_STRING = 64

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")

# Functions as the SDK names them (torch.fx's qualified names; Python operators as `operator.*`).
_TORCH = """abs all amax amin any argmax argmin cat ceil clamp clamp_max clamp_min clip count_nonzero cumsum
 detach div eq exp exp2 expm1 flatten floor gather ge gt isfinite isinf isnan le log log10 log1p log2 log_softmax
 logaddexp logical_and logical_not logical_or logsumexp lt masked_fill max maximum mean min minimum mul nan_to_num
 nansum ne neg norm ones_like permute pow prod reciprocal round rsqrt sigmoid sign softmax sort sqrt square squeeze
 stack std sub sum tanh topk transpose unsqueeze var where zeros_like full_like relu cumprod diff
 take_along_dim""".split()
_FUNCTIONAL = """cross_entropy kl_div log_softmax logsigmoid mse_loss nll_loss normalize relu silu softmax
 binary_cross_entropy_with_logits smooth_l1_loss l1_loss huber_loss""".split()
_NN_C = "log_sigmoid gelu softplus".split()  # torch.nn.functional builtins, named by their C module
_OPERATOR = """abs add and_ eq floordiv ge getitem gt invert le lt mod mul ne neg not_ or_ pos pow sub truediv
 xor""".split()
_MATH = "exp log log1p log2 log10 sqrt tanh isfinite isnan fabs".split()
FUNCTIONS = frozenset(
    [f"torch.{n}" for n in _TORCH] + [f"torch.nn.functional.{n}" for n in _FUNCTIONAL]
    + [f"torch._C._nn.{n}" for n in _NN_C] + ["torch._C._linalg.linalg_vector_norm"]
    + [f"operator.{n}" for n in _OPERATOR] + [f"math.{n}" for n in _MATH] + ["getattr"]
)
# Tensor methods that compute a new tensor (no in-place `*_`, nothing that leaves torch or takes sizes).
METHODS = frozenset("""abs amax amin any all argmax argmin bool ceil clamp clamp_max clamp_min clip clone contiguous
 cumsum detach dim div double eq exp exp2 expand_as expm1 flatten float floor gather ge gt half isfinite isnan le log
 log10 log1p log2 log_softmax logsumexp lt masked_fill max maximum mean min minimum mul nansum ne neg norm numel
 permute pow prod reciprocal reshape round rsqrt sigmoid sign size softmax sort sqrt square squeeze std sub sum t tanh
 to topk transpose type_as unsqueeze var view view_as where long int""".split())
ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "values", "indices", "T", "mT"})
DTYPES = frozenset({"float32", "float64", "float16", "bfloat16", "int64", "int32", "bool"})
_REFUSED_KWARGS = frozenset({"out", "generator", "requires_grad", "pin_memory"})


@dataclass(frozen=True)
class Ref:
    """An earlier node's value."""

    name: str


@dataclass(frozen=True)
class Slice:
    start: Any
    stop: Any
    step: Any


@dataclass(frozen=True)
class DType:
    name: str  # one of DTYPES


@dataclass(frozen=True)
class Device:
    """A device argument; the engine always computes on the logprobs' device."""

    name: str


@dataclass(frozen=True)
class Node:
    op: str  # placeholder | call_function | call_method | output
    name: str
    target: str
    args: tuple
    kwargs: dict


@dataclass(frozen=True)
class CustomLoss:
    """A validated custom loss: its inputs (`logprobs` first) with ranks, and its nodes in order."""

    name: str
    inputs: tuple[tuple[str, int], ...]
    nodes: tuple[Node, ...]
    definition: dict  # the request's {name, inputs, graph} as received: what the Store keeps

    @property
    def input_names(self) -> tuple[str, ...]:
        """The `loss_fn_inputs` keys the loss reads, after logprobs."""
        return tuple(name for name, _ in self.inputs[1:])


def parse_custom_loss(definition: Any) -> CustomLoss:
    """A `CustomLoss` from `{name, inputs: [{name, rank}], graph: {format, nodes}}`, or BadRequest naming
    the field or `graph.nodes[i]` that is refused. Runs nothing."""
    if not isinstance(definition, dict):
        raise BadRequest("body: expected an object with name, inputs and graph")
    name = definition.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= 128:
        raise BadRequest("name: a loss name of 1 to 128 characters is required")
    inputs = _inputs(definition.get("inputs"))
    graph = definition.get("graph")
    if not isinstance(graph, dict) or graph.get("format", 1) != 1:
        raise BadRequest("graph: expected {format: 1, nodes: [...]}")
    raw_nodes = graph.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise BadRequest("graph.nodes: a non-empty list is required")
    if len(raw_nodes) > MAX_NODES:
        raise BadRequest(f"graph.nodes: {len(raw_nodes)} nodes; a custom loss has at most {MAX_NODES}")
    parser = _Parser()
    nodes = tuple(parser.node(i, raw, inputs) for i, raw in enumerate(raw_nodes))
    if nodes[-1].op != "output":
        raise BadRequest(f"graph.nodes[{len(nodes) - 1}] ({nodes[-1].name!r}): the last node must be the output")
    placeholders = [n.target for n in nodes if n.op == "placeholder"]
    if placeholders != [n for n, _ in inputs]:
        raise BadRequest(f"graph: placeholders {placeholders} do not match inputs {[n for n, _ in inputs]} in order")
    return CustomLoss(name, inputs, nodes, {"name": name, "inputs": [{"name": n, "rank": r} for n, r in inputs],
                                            "graph": {"format": 1, "nodes": raw_nodes}})


def _inputs(raw: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_INPUTS:
        raise BadRequest(f"inputs: a list of 1 to {MAX_INPUTS} inputs is required, logprobs first")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) \
                or not _INPUT_NAME.fullmatch(item["name"]):
            raise BadRequest(f"inputs[{i}].name must be a lowercase name of letters, digits and underscores")
        rank = item.get("rank")
        if isinstance(rank, bool) or rank not in (0, 1, 2):
            raise BadRequest(f"inputs[{i}].rank must be 0, 1 or 2, got {rank!r}")
        out.append((item["name"], int(rank)))
    if out[0][0] != "logprobs" or out[0][1] == 0:
        raise BadRequest("inputs[0] must be logprobs with rank 1 ([T]) or 2 ([T, K])")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise BadRequest(f"inputs: names must be unique, got {names}")
    return tuple(out)


class _Parser:
    """Decodes nodes in order, keeping the names defined so far and the encoded size."""

    def __init__(self) -> None:
        self.defined: set[str] = set()
        self.items = 0
        self.seen_output = False

    def node(self, i: int, raw: Any, inputs) -> Node:
        if not isinstance(raw, dict):
            raise BadRequest(f"graph.nodes[{i}]: expected an object")
        name, op, target = raw.get("name"), raw.get("op"), raw.get("target")
        where = f"graph.nodes[{i}] ({name!r})"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise BadRequest(f"graph.nodes[{i}]: name must be an identifier, got {name!r}")
        if name in self.defined:
            raise BadRequest(f"{where}: the name is used by an earlier node")
        if self.seen_output:
            raise BadRequest(f"{where}: nodes after the output are not allowed")
        if not isinstance(target, str) or len(target) > 256:
            raise BadRequest(f"{where}: target must be a string")
        args, kwargs = raw.get("args", []), raw.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise BadRequest(f"{where}: args must be a list and kwargs an object")
        decoded_args = tuple(self.value(a, where, 0) for a in args)
        decoded_kwargs = {}
        for key, value in kwargs.items():
            if key in _REFUSED_KWARGS:
                raise BadRequest(f"{where}: keyword argument {key!r} is not allowed in a custom loss")
            decoded_kwargs[key] = self.value(value, where, 0)
        node = Node(op, name, target, decoded_args, decoded_kwargs)
        self.check(node, where, len(self.defined), inputs)
        self.defined.add(name)
        return node

    def check(self, node: Node, where: str, index: int, inputs) -> None:
        op, target = node.op, node.target
        if op == "placeholder":
            if node.args or node.kwargs or index >= len(inputs):
                raise BadRequest(f"{where}: unexpected placeholder {target!r} (the inputs are "
                                 f"{[n for n, _ in inputs]})")
        elif op == "call_function":
            if target not in FUNCTIONS:
                raise BadRequest(f"{where}: function {target!r} is not allowed in a custom loss (allowed: torch, "
                                 "torch.nn.functional, math and operator functions that compute on tensors)")
            if target == "getattr" and (len(node.args) != 2 or not isinstance(node.args[0], Ref)
                                        or node.args[1] not in ATTRIBUTES):
                raise BadRequest(f"{where}: getattr may only read {sorted(ATTRIBUTES)} of a node")
        elif op == "call_method":
            if target not in METHODS:
                raise BadRequest(f"{where}: tensor method {target!r} is not allowed in a custom loss")
            if not node.args or not isinstance(node.args[0], Ref):
                raise BadRequest(f"{where}: a method call needs a node as its first argument")
        elif op == "output":
            self.seen_output = True
            _check_output(node, where)
        elif op in ("call_module", "get_attr"):
            raise BadRequest(f"{where}: {op} nodes are not allowed (a custom loss may only compute on logprobs and "
                             "the loss_fn_inputs it names, with functions, not modules or captured tensors)")
        else:
            raise BadRequest(f"{where}: unknown op {op!r}")

    def value(self, v: Any, where: str, depth: int) -> Any:
        self.items += 1
        if self.items > MAX_ARG_ITEMS:
            raise BadRequest(f"{where}: the graph's arguments hold more than {MAX_ARG_ITEMS} values")
        if depth > MAX_ARG_DEPTH:
            raise BadRequest(f"{where}: arguments nested deeper than {MAX_ARG_DEPTH}")
        if v is None or isinstance(v, bool):
            return v
        if isinstance(v, int):
            if abs(v) > MAX_INT:
                raise BadRequest(f"{where}: integer constant {v} is larger than {MAX_INT}")
            return v
        if isinstance(v, float):
            return v
        if isinstance(v, str):
            if len(v) > MAX_STRING:
                raise BadRequest(f"{where}: string constant longer than {MAX_STRING} characters")
            return v
        if isinstance(v, list):
            return [self.value(a, where, depth + 1) for a in v]
        if not isinstance(v, dict) or len(v) != 1:
            raise BadRequest(f"{where}: cannot decode argument {str(v)[:80]!r}")
        (kind, body), = v.items()
        if kind == "ref":
            if not isinstance(body, str) or body not in self.defined:
                raise BadRequest(f"{where}: refers to {body!r}, which is not an earlier node")
            return Ref(body)
        if kind == "tuple" and isinstance(body, list):
            return tuple(self.value(a, where, depth + 1) for a in body)
        if kind == "dict" and isinstance(body, dict):
            return {str(k)[:MAX_STRING]: self.value(a, where, depth + 1) for k, a in body.items()}
        if kind == "slice" and isinstance(body, list) and len(body) == 3:
            parts = [self.value(a, where, depth + 1) for a in body]
            if not all(p is None or isinstance(p, (int, Ref)) and not isinstance(p, bool) for p in parts):
                raise BadRequest(f"{where}: slice bounds must be integers, nodes or null")
            return Slice(*parts)
        if kind == "ellipsis" and body is True:
            return Ellipsis
        if kind == "float" and body in ("inf", "-inf", "nan"):
            return float(body)
        if kind == "dtype" and body in DTYPES:
            return DType(body)
        if kind == "device" and isinstance(body, str) and re.fullmatch(r"(cpu|cuda|mps)(:\d{1,2})?", body):
            return Device(body)
        if kind == "layout" and body == "strided":
            return None
        if kind == "memory_format" and body in ("contiguous_format", "preserve_format"):
            return None
        raise BadRequest(f"{where}: argument {kind!r} {str(body)[:40]!r} is not allowed")


def _check_output(node: Node, where: str) -> None:
    out = node.args[0] if len(node.args) == 1 else None
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], Ref) and isinstance(out[1], dict)):
        raise BadRequest(f"{where}: the output must be (loss, metrics), a node and a dict of nodes")
    for key, value in out[1].items():
        if not _METRIC_KEY.fullmatch(key):
            raise BadRequest(f"{where}: metric {key!r} must be named custom/<name>:sum or custom/<name>:mean")
        if not isinstance(value, Ref):
            raise BadRequest(f"{where}: metric {key!r} must be a node")


def datum_input(datum: Datum, name: str, rank: int) -> np.ndarray | None:
    """A datum's value for an input of `rank`, or None if absent or of another rank. A rank-0 value arrives
    over protobuf as one value without a shape (protobuf cannot send an empty shape); it is taken as a scalar."""
    value = datum.loss_inputs.get("target_tokens" if name == "logprobs" else name)
    if value is None:
        return None
    if rank == 0 and value.ndim == 1 and value.size == 1:
        return value.reshape(())
    return value if value.ndim == rank else None


def check_datums(loss: CustomLoss, data: list[Datum]) -> None:
    """Every datum has every input the loss reads, at its declared rank (logprobs: target_tokens' rank)."""
    if not data:
        raise BadRequest("data: at least one datum is required")
    for i, datum in enumerate(data):
        for name, rank in loss.inputs:
            key = "target_tokens" if name == "logprobs" else name
            value = datum.loss_inputs.get(key)
            if value is None:
                raise BadRequest(f"data[{i}].loss_fn_inputs.{key} is required by custom loss {loss.name!r}")
            if datum_input(datum, name, rank) is None:
                raise BadRequest(f"data[{i}].loss_fn_inputs.{key} has rank {value.ndim}, but custom loss "
                                 f"{loss.name!r} declared {name} with rank {rank}")
            if key != "target_tokens" and value.dtype.kind == "f" and not np.isfinite(value).all():
                raise BadRequest(f"data[{i}].loss_fn_inputs.{key} contains NaN or infinite values")

