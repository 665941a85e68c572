"""Helpers shared by the RL losses: numeric config validation and reductions over real tokens."""

from __future__ import annotations

import math

import torch

from tinkerd.protocol.types import BadRequest


def number(config: dict, key: str) -> float:
    """`config[key]` as a finite float, or BadRequest naming `loss_fn_config.<key>`."""
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"loss_fn_config.{key} must be a finite number, got {value!r}")
    return float(value)


def clip_bounds(config: dict) -> tuple[float, float]:
    """The validated (clip_low_threshold, clip_high_threshold): 0 <= low <= high."""
    lo, hi = number(config, "clip_low_threshold"), number(config, "clip_high_threshold")
    if lo < 0:
        raise BadRequest(f"loss_fn_config.clip_low_threshold must be >= 0, got {lo}")
    if lo > hi:
        raise BadRequest(f"loss_fn_config.clip_low_threshold must be <= clip_high_threshold, got {lo} > {hi}")
    return lo, hi


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of `x` over real positions (mask 1); 0.0 if there are none."""
    return float((x * mask).sum() / mask.sum().clamp(min=1.0))


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, lo: float, hi: float):
    """PPO's pessimistic term per token: (-mask·min(r·A, clip(r, lo, hi)·A), clip fraction).

    Clipping is active where the min picks the clipped branch strictly (A > 0 and r > hi, or A < 0
    and r < lo): those tokens get no gradient. The fraction is over real tokens.
    """
    objective = torch.minimum(ratio * adv, ratio.clamp(lo, hi) * adv)
    active = ((adv > 0) & (ratio > hi)) | ((adv < 0) & (ratio < lo))
    return -(mask * objective), masked_mean(active.float(), mask)
