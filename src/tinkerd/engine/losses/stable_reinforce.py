"""stable_reinforce (tinkerd's version; Tinker's hosted formula is unpublished):
loss = -Σ mask·w·lp·A + kl_coeff·Σ mask·k3, with q' = `sampler_logprobs` if given else `logprobs`,
w = sg(min(exp(lp - q'), clip_high)) a truncated, detached importance weight, and
k3 = exp(q' - lp) - (q' - lp) - 1 >= 0 the k3 estimator of KL(learner || sampler).
Gradient per token: -w·A + kl_coeff·(1 - exp(q' - lp)). Defaults clip_high 2.0 (> 0), kl_coeff 0.0 (>= 0).
Metrics: importance_weight:mean (of w) and kl:mean (of k3) over real tokens; kl_penalty:sum if kl_coeff > 0.
"""

from __future__ import annotations

import torch

from tinkerd.engine.losses._common import masked_mean, number
from tinkerd.protocol.types import BadRequest

STABLE_REINFORCE_DEFAULTS = {"clip_high": 2.0, "kl_coeff": 0.0}


def stable_reinforce_params(config: dict) -> tuple[float, float]:
    clip_high, kl_coeff = number(config, "clip_high"), number(config, "kl_coeff")
    if clip_high <= 0:
        raise BadRequest(f"loss_fn_config.clip_high must be > 0, got {clip_high}")
    if kl_coeff < 0:
        raise BadRequest(f"loss_fn_config.kl_coeff must be >= 0, got {kl_coeff}")
    return clip_high, kl_coeff


def stable_reinforce(lp: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict):
    clip_high, kl_coeff = stable_reinforce_params(config)
    mask = inputs["mask"]
    sampler = inputs.get("sampler_logprobs", inputs["logprobs"])
    log_ratio = (lp - sampler) * mask  # log(learner / sampler), 0 on padding
    weight = torch.exp(log_ratio).clamp(max=clip_high).detach()
    k3 = torch.exp(-log_ratio) + log_ratio - 1.0
    per_token = -(mask * weight * lp * inputs["advantages"])
    metrics = {"importance_weight:mean": masked_mean(weight, mask), "kl:mean": masked_mean(k3.detach(), mask)}
    if kl_coeff > 0:
        penalty = kl_coeff * (mask * k3)
        per_token = per_token + penalty
        metrics["kl_penalty:sum"] = float(penalty.detach().sum())
    return per_token, metrics
