"""Runs a validated server-side custom loss (`tinkerd.protocol.custom_loss.CustomLoss`) on one datum.

The graph was parsed as data; here it is interpreted node by node. Functions are looked up only
among the allow-listed names (`FUNCTIONS`, resolved from the torch, math and operator modules), and
methods only on a receiver that is a tensor and only if `METHODS` lists them. Tensor sizes stay
bounded while it runs: a node whose tensor arguments broadcast, or that indexes with tensors, is
checked before it runs; every result after (`MAX_ELEMENTS` per tensor and `MAX_TOTAL_ELEMENTS` for
all values one datum keeps for its backward pass). Python-number `pow` is limited, and operators are
refused on lists and strings, so no node can build a huge Python value either. Any error is a
BadRequest naming the loss and the node.

Semantics as the SDK's client-side `run_loss_handle`: per datum, `fn(logprobs, *inputs)` returns a
scalar loss and scalar metrics; the request's loss is the sum over datums, `:sum` metrics add up and
`:mean` metrics average over datums. Knows nothing about batching, adapters or the wire.
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Any

import numpy as np
import torch

from tinkerd.protocol.custom_loss import FUNCTIONS, CustomLoss, Device, DType, Ref, Slice, datum_input
from tinkerd.protocol.types import BadRequest, Datum

log = logging.getLogger(__name__)

MAX_ELEMENTS = 1 << 22  # one tensor: 16 MiB of fp32
MAX_TOTAL_ELEMENTS = 1 << 25  # every value of one datum's graph: 128 MiB of fp32
MAX_SCALAR_EXPONENT = 64

_ROOTS = {"torch": torch, "math": math, "operator": operator}


def _resolve(qualified: str):
    if qualified == "getattr":
        return getattr
    root, *path = qualified.split(".")
    obj: Any = _ROOTS[root]
    for part in path:
        obj = getattr(obj, part)
    return obj


def _resolve_all() -> dict[str, Any]:
    table = {}
    for name in sorted(FUNCTIONS):
        try:
            table[name] = _resolve(name)
        except AttributeError:  # not in this torch version: nodes calling it fail with a clear error
            log.info("custom losses: %s is not available in this torch", name)
    return table


_FUNCTIONS = _resolve_all()


def datum_values(loss: CustomLoss, datum: Datum, logprobs: torch.Tensor) -> list[torch.Tensor]:
    """The graph's arguments for one datum: its logprobs, then its inputs as tensors on the same device."""
    values = [logprobs]
    for name, rank in loss.inputs[1:]:
        array = datum_input(datum, name, rank)
        dtype = torch.float32 if array.dtype.kind == "f" else torch.int64
        values.append(torch.from_numpy(np.array(array)).to(device=logprobs.device, dtype=dtype))  # keeps rank 0
    return values


def run_custom_loss(loss: CustomLoss, values: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """One datum's (scalar loss tensor, metrics)."""
    env: dict[str, Any] = {}
    placeholders = iter(values)
    device = values[0].device
    kept = sum(v.numel() for v in values)
    for node in loss.nodes:
        where = f"custom loss {loss.name!r}, node {node.name!r}"
        if node.op == "placeholder":
            env[node.name] = next(placeholders)
            continue
        if node.op == "output":
            return _output(node.args[0], env, where)
        args = tuple(_value(a, env, device) for a in node.args)
        kwargs = {k: _value(v, env, device) for k, v in node.kwargs.items()}
        fn = _callable(node.op, node.target, args, where)
        _check_before(node.target, fn, args, kwargs, where)  # a method's receiver included
        if node.op == "call_method":
            args = args[1:]
        try:
            result = fn(*args, **kwargs)
        except BadRequest:
            raise
        except Exception as exc:  # a shape mismatch, a wrong argument type: the user's graph
            raise BadRequest(f"{where}: {type(exc).__name__}: {exc}") from None
        kept += _elements(result, where)
        if kept > MAX_TOTAL_ELEMENTS:
            raise BadRequest(f"{where}: the loss keeps more than {MAX_TOTAL_ELEMENTS} tensor elements for one datum")
        env[node.name] = result
    raise BadRequest(f"custom loss {loss.name!r} has no output node")


def _value(v: Any, env: dict, device: torch.device) -> Any:
    if isinstance(v, Ref):
        return env[v.name]
    if isinstance(v, list):
        return [_value(a, env, device) for a in v]
    if isinstance(v, tuple):
        return tuple(_value(a, env, device) for a in v)
    if isinstance(v, dict):
        return {k: _value(a, env, device) for k, a in v.items()}
    if isinstance(v, Slice):
        return slice(_value(v.start, env, device), _value(v.stop, env, device), _value(v.step, env, device))
    if isinstance(v, DType):
        return getattr(torch, v.name)
    if isinstance(v, Device):
        return device
    return v


def _callable(op: str, target: str, args: tuple, where: str):
    if op == "call_function":
        fn = _FUNCTIONS.get(target)
        if fn is None:
            raise BadRequest(f"{where}: {target!r} is not available on this server")
        if target == "getattr" and not isinstance(args[0], (torch.Tensor, tuple)):
            raise BadRequest(f"{where}: getattr of a {type(args[0]).__name__}, not a tensor")
        return fn
    receiver = args[0]
    if not isinstance(receiver, torch.Tensor):
        raise BadRequest(f"{where}: method {target!r} called on a {type(receiver).__name__}, not a tensor")
    return getattr(receiver, target)


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]


def _check_before(target: str, fn, args: tuple, kwargs: dict, where: str) -> None:
    """Refuse, before it runs, a node that would build a tensor or Python value beyond the bounds."""
    if fn in (operator.getitem,) and isinstance(args[0], torch.Tensor):
        bound = _index_bound(args[0], args[1])
        if bound > MAX_ELEMENTS:
            raise BadRequest(f"{where}: indexing would make a tensor of up to {bound} elements (limit {MAX_ELEMENTS})")
        return
    if target.startswith("operator.") and fn is not operator.getitem:
        if any(isinstance(a, (list, tuple, str, bytes)) for a in args):
            raise BadRequest(f"{where}: Python operators apply to tensors and numbers only")
        if fn is operator.pow and not _tensors(args, kwargs) and abs(args[1]) > MAX_SCALAR_EXPONENT:
            raise BadRequest(f"{where}: a number raised to the power {args[1]} (limit {MAX_SCALAR_EXPONENT})")
    tensors = _tensors(args, kwargs)
    if len(tensors) >= 2:
        try:
            shape = torch.broadcast_shapes(*(t.shape for t in tensors))
        except RuntimeError:
            return  # not a broadcasting op (gather, cross_entropy...): its result is bounded by its inputs
        if math.prod(shape) > MAX_ELEMENTS:
            raise BadRequest(f"{where}: broadcasting to shape {tuple(shape)} exceeds {MAX_ELEMENTS} elements")


def _index_bound(x: torch.Tensor, index: Any) -> int:
    """An upper bound on the elements `x[index]` makes (basic slicing never exceeds x.numel())."""
    parts = index if isinstance(index, tuple) else (index,)
    advanced = [p for p in parts if isinstance(p, (torch.Tensor, list))]
    if not advanced:
        return x.numel()
    if len(advanced) == 1 and isinstance(advanced[0], torch.Tensor) and advanced[0].dtype == torch.bool:
        return x.numel()
    count = max(p.numel() if isinstance(p, torch.Tensor) else len(p) for p in advanced)
    return count * x.numel()


def _elements(result: Any, where: str) -> int:
    if isinstance(result, torch.Tensor):
        if result.numel() > MAX_ELEMENTS:
            raise BadRequest(f"{where}: makes a tensor of {result.numel()} elements (limit {MAX_ELEMENTS})")
        return result.numel()
    if isinstance(result, tuple):  # torch.return_types, torch.Size, topk/sort/max pairs
        return sum(_elements(r, where) for r in result)
    if isinstance(result, (bool, int, float, torch.dtype)):
        return 0
    raise BadRequest(f"{where}: produced a {type(result).__name__}; a custom loss computes tensors and numbers")


def _output(out: tuple, env: dict, where: str) -> tuple[torch.Tensor, dict[str, float]]:
    loss = env[out[0].name]
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.is_floating_point():
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise BadRequest(f"{where}: the loss must be a scalar floating-point tensor, got {shape}")
    metrics = {}
    for key, ref in out[1].items():
        value = env[ref.name]
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise BadRequest(f"{where}: metric {key!r} must be a scalar, got shape {tuple(value.shape)}")
            value = value.detach().item()
        if not isinstance(value, (int, float)):
            raise BadRequest(f"{where}: metric {key!r} must be a number")
        metrics[key] = float(value)
    return loss, metrics
