"""The built-in losses, by wire name. Every loss is a token sum over the batch (no normalisation).

A loss receives the learner's logprobs of the target tokens, `lp` (B, T, K) with gradient, and
the loss inputs as padded tensors of the same shape (padding carries weight 0), and returns the
scalar loss plus extra metrics. The trainer adds `loss:sum` and the per-datum `logprobs` outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tinkerd.engine.losses.cross_entropy import cross_entropy
from tinkerd.protocol.types import BadRequest

LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor], dict], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Loss:
    fn: LossFn
    required_inputs: tuple[str, ...]


LOSSES: dict[str, Loss] = {
    "cross_entropy": Loss(cross_entropy, ("target_tokens", "weights")),
}


def get_loss(name: str) -> Loss:
    loss = LOSSES.get(name)
    if loss is None:
        raise BadRequest(f"loss_fn {name!r} is not supported; known losses: {', '.join(sorted(LOSSES))}")
    return loss
