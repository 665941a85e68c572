"""The built-in losses, by wire name. Every loss is a token sum over the batch (no normalisation).

Contract of a loss function `fn(lp, inputs, config) -> (loss, metrics)`:
- `lp` (B, T, K) float32 with gradient: the learner's logprobs of `target_tokens` (K = 1 for 1-D targets).
- `inputs`: every loss input the loss declares, as (B, T, K) float32 tensors, zero in padding,
  plus `mask` (1.0 on real positions and real K columns, 0.0 on padding).
- `config`: the request's `loss_fn_config` merged over the loss's defaults (unknown keys are refused).
- returns the scalar loss and extra metrics keyed `name:reduction` (`sum`, `mean`, `min`, `max`).
The trainer adds `loss:sum` and the per-datum `logprobs` outputs itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from tinkerd.engine.losses.cross_entropy import cross_entropy
from tinkerd.protocol.types import BadRequest

LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor], dict], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Loss:
    fn: LossFn
    required_inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...] = ()
    config_defaults: dict[str, float | str] = field(default_factory=dict)

    def resolve_config(self, name: str, config: dict[str, float | str]) -> dict[str, float | str]:
        unknown = sorted(set(config) - set(self.config_defaults))
        if unknown:
            known = ", ".join(sorted(self.config_defaults)) or "none"
            raise BadRequest(f"loss_fn_config.{unknown[0]} is not used by {name} (it accepts: {known})")
        return {**self.config_defaults, **config}


LOSSES: dict[str, Loss] = {
    "cross_entropy": Loss(cross_entropy, ("target_tokens", "weights")),
}


def get_loss(name: str) -> Loss:
    loss = LOSSES.get(name)
    if loss is None:
        raise BadRequest(f"loss_fn {name!r} is not supported; known losses: {', '.join(sorted(LOSSES))}")
    return loss
