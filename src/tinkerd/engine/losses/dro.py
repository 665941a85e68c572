"""dro: loss = -Σ mask·(lp·A - ½·β·(lp - q)²), β = loss_fn_config.beta (default 0.05, must be >= 0).

Direct reward optimisation: a linear policy-gradient term plus a quadratic penalty that keeps the
learner near the sampler. The penalty does not vanish with A = 0, so it is masked explicitly.
Tinker publishes no default for beta; 0.05 is the value its docs use in their example.
"""

from __future__ import annotations

import torch

from tinkerd.engine.losses._common import number
from tinkerd.protocol.types import BadRequest

DRO_DEFAULTS = {"beta": 0.05}


def dro_beta(config: dict) -> float:
    beta = number(config, "beta")
    if beta < 0:
        raise BadRequest(f"loss_fn_config.beta must be >= 0, got {beta}")
    return beta


def dro(lp: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict):
    beta = dro_beta(config)
    mask = inputs["mask"]
    log_ratio = (lp - inputs["logprobs"]) * mask
    penalty = 0.5 * beta * log_ratio**2  # (B, T, K), 0 on padding
    per_token = -(mask * lp * inputs["advantages"]) + penalty
    return per_token, {"quadratic_penalty:sum": float(penalty.detach().sum())}
