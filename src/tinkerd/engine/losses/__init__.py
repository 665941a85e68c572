"""The built-in losses, by wire name. Every loss is a token sum over the batch (no normalisation).

Contract of a loss function `per_token(lp, inputs, config) -> (loss_B_T_K, metrics)`:
- `lp` (B, T, K) float32 with gradient: the learner's logprobs of `target_tokens` (K = 1 for 1-D targets).
- `inputs`: every loss input the loss declares, as (B, T, K) float32 tensors, zero in padding,
  plus `mask` (1.0 on real positions and real K columns, 0.0 on padding).
- `config`: the request's `loss_fn_config` merged over the loss's defaults (unknown keys are refused,
  and `check_config`, if any, validates the values before the forward pass).
- returns the loss of every token, (B, T, K) and zero on padding, whose sum is the loss, and extra
  metrics keyed `name:reduction` (`sum`, `mean`, `min`, `max`).
The trainer adds `loss:sum` and the per-datum `logprobs` and `elementwise_loss` outputs itself;
`Loss.fn` is the summed form (scalar loss, metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from tinkerd.engine.losses._common import clip_bounds
from tinkerd.engine.losses.cispo import CISPO_DEFAULTS, cispo
from tinkerd.engine.losses.cross_entropy import cross_entropy
from tinkerd.engine.losses.dro import DRO_DEFAULTS, dro, dro_beta
from tinkerd.engine.losses.gspo import GSPO_DEFAULTS, gspo
from tinkerd.engine.losses.importance_sampling import importance_sampling
from tinkerd.engine.losses.ppo import PPO_DEFAULTS, ppo
from tinkerd.engine.losses.stable_reinforce import (STABLE_REINFORCE_DEFAULTS, stable_reinforce,
                                                    stable_reinforce_params)
from tinkerd.protocol.types import BadRequest

LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor], dict], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Loss:
    per_token: LossFn
    required_inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...] = ()
    config_defaults: dict[str, float | str] = field(default_factory=dict)
    check_config: Callable[[dict], Any] | None = None  # raises BadRequest naming the bad field

    def fn(self, lp: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict) -> tuple[torch.Tensor, dict]:
        """The scalar loss (the sum of `per_token`) and the metrics."""
        per_token, metrics = self.per_token(lp, inputs, config)
        return per_token.sum(), metrics

    def resolve_config(self, name: str, config: dict[str, float | str]) -> dict[str, float | str]:
        unknown = sorted(set(config) - set(self.config_defaults))
        if unknown:
            known = ", ".join(sorted(self.config_defaults)) or "none"
            raise BadRequest(f"loss_fn_config.{unknown[0]} is not used by {name} (it accepts: {known})")
        resolved = {**self.config_defaults, **config}
        if self.check_config is not None:
            self.check_config(resolved)  # before any forward pass
        return resolved


_RL_INPUTS = ("target_tokens", "logprobs", "advantages")

# Listed in this order in error messages: supervised first, then the RL losses.
LOSSES: dict[str, Loss] = {
    "cross_entropy": Loss(cross_entropy, ("target_tokens", "weights")),
    "importance_sampling": Loss(importance_sampling, _RL_INPUTS),
    "ppo": Loss(ppo, _RL_INPUTS, (), PPO_DEFAULTS, clip_bounds),
    "cispo": Loss(cispo, _RL_INPUTS, (), CISPO_DEFAULTS, clip_bounds),
    "dro": Loss(dro, _RL_INPUTS, (), DRO_DEFAULTS, dro_beta),
    "gspo": Loss(gspo, (*_RL_INPUTS, "sequence_ratio_mask"), (), GSPO_DEFAULTS, clip_bounds),
    "stable_reinforce": Loss(stable_reinforce, _RL_INPUTS, ("sampler_logprobs",), STABLE_REINFORCE_DEFAULTS,
                             stable_reinforce_params),
}


def get_loss(name: str) -> Loss:
    loss = LOSSES.get(name)
    if loss is None:
        raise BadRequest(f"loss_fn {name!r} is not supported; known losses: {', '.join(LOSSES)}")
    return loss
