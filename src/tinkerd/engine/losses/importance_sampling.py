"""importance_sampling: loss = -Σ mask·r·A with r = exp(lp - q), q = sampler `logprobs`, A = `advantages`.

The plain importance-weighted policy gradient (REINFORCE corrected for the sampler/learner mismatch);
the gradient with respect to lp is -r·A. No config.
"""

from __future__ import annotations

import torch


def importance_sampling(lp: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict):
    mask = inputs["mask"]
    ratio = torch.exp((lp - inputs["logprobs"]) * mask)  # 1 on padding, never inf there
    return -(mask * ratio * inputs["advantages"]), {}
