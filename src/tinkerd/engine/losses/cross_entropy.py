"""cross_entropy: per token -weights * logp(target). Weights may be any real number, targets (T,) or (T, K)."""

from __future__ import annotations

import torch


def cross_entropy(lp: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict) -> tuple[torch.Tensor, dict]:
    return -(inputs["weights"] * lp), {}
