"""cispo: loss = -Σ mask·sg(clip(r, lo, hi))·lp·A, r = exp(lp - q), sg = stop-gradient.

The clipped ratio is a detached coefficient on lp, so every token keeps a gradient (-clip(r)·A).
Defaults are Tinker's documented one-sided clip: clip_low_threshold 0.0, clip_high_threshold 4.0.
Metric `clip_fraction:mean`: fraction of real tokens whose ratio lies outside [lo, hi].
"""

from __future__ import annotations

import torch

from tinkerd.engine.losses._common import clip_bounds, masked_mean

CISPO_DEFAULTS = {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}


def cispo(lp: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict):
    lo, hi = clip_bounds(config)
    mask = inputs["mask"]
    ratio = torch.exp((lp - inputs["logprobs"]) * mask).detach()
    per_token = -(mask * ratio.clamp(lo, hi) * lp * inputs["advantages"])
    return per_token, {"clip_fraction:mean": masked_mean(((ratio < lo) | (ratio > hi)).float(), mask)}
