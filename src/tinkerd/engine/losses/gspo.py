"""gspo (GSPO-token): per datum b, with M_b = real tokens where sequence_ratio_mask != 0,
s_b = exp(Σ_{t∈M_b} (sg(lp_bt) - q_bt) / max(|M_b|, 1)) and r_bt = s_b·exp(lp_bt - sg(lp_bt)), so every
token carries its sequence's ratio with the gradient of its own logprob; then the PPO term
loss = -Σ mask·min(r·A, clip(r, lo, hi)·A). Config keys as ppo (clip_low_threshold 0.8,
clip_high_threshold 1.2 by default; Tinker documents no GSPO defaults, and the GSPO paper clips far
tighter, about 1 - 3e-4 .. 1 + 4e-4). A datum with an empty M_b gets s_b = 1.
"""

from __future__ import annotations

import torch

from tinkerd.engine.losses._common import clip_bounds, clipped_surrogate, masked_mean

GSPO_DEFAULTS = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}


def gspo(lp: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict):
    lo, hi = clip_bounds(config)
    mask = inputs["mask"]
    in_ratio = (inputs["sequence_ratio_mask"] != 0).float() * mask
    dims = tuple(range(1, lp.dim()))
    log_s = (in_ratio * (lp.detach() - inputs["logprobs"])).sum(dims) / in_ratio.sum(dims).clamp(min=1.0)
    log_s = log_s.view(-1, *([1] * (lp.dim() - 1)))
    ratio = torch.exp(log_s + (lp - lp.detach()) * mask)
    per_token, clip_fraction = clipped_surrogate(ratio, inputs["advantages"], mask, lo, hi)
    return per_token, {"clip_fraction:mean": clip_fraction,
                  "sequence_ratio:mean": masked_mean(torch.exp(log_s).expand_as(mask), mask)}
