"""ppo: loss = -Σ mask·min(r·A, clip(r, lo, hi)·A), r = exp(lp - q), token-wise.

`lo` = loss_fn_config.clip_low_threshold (default 0.8), `hi` = clip_high_threshold (default 1.2):
Tinker's documented ε_low = ε_high = 0.2. Metric `clip_fraction:mean` is the fraction of real tokens
whose gradient the clip removes (A > 0 and r > hi, or A < 0 and r < lo).
"""

from __future__ import annotations

import torch

from tinkerd.engine.losses._common import clip_bounds, clipped_surrogate

PPO_DEFAULTS = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}


def ppo(lp: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict):
    lo, hi = clip_bounds(config)
    mask = inputs["mask"]
    ratio = torch.exp((lp - inputs["logprobs"]) * mask)
    per_token, clip_fraction = clipped_surrogate(ratio, inputs["advantages"], mask, lo, hi)
    return per_token, {"clip_fraction:mean": clip_fraction}
