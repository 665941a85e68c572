"""Custom losses the tests upload, traced and encoded by the official SDK exactly as `create_custom_loss` does.

- `dpo`: one datum holds a chosen and a rejected completion after each other (masks pick them), with the
  reference model's logprobs and a scalar (rank 0) beta; loss -logsigmoid(beta * margin).
- `weighted_nll`: -sum(weights * logprobs), the SDK docstring's example.
- `soft_targets`: a [T, K] logprobs input (K candidate tokens per position) against [T, K] probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss


def dpo(logprobs, ref_logprobs, chosen_mask, rejected_mask, beta):
    delta = logprobs - ref_logprobs
    margin = (delta * chosen_mask).sum() - (delta * rejected_mask).sum()
    loss = -F.logsigmoid(beta * margin)
    return loss, {"custom/margin:mean": margin.detach(), "custom/accuracy:mean": (margin > 0).float(),
                  "custom/dpo:sum": loss.detach()}


def weighted_nll(logprobs, weights):
    loss = -(logprobs * weights).sum()
    return loss, {"custom/nll:sum": loss.detach(), "custom/tokens:mean": weights.sum()}


def soft_targets(logprobs, probs):
    per_position = -(probs * logprobs).sum(dim=-1)
    return per_position.sum(), {"custom/max_position:mean": per_position.max(), "custom/k:mean": logprobs.shape[1] * 1.0
                                + torch.zeros_like(per_position).sum()}


CASES = {
    "dpo": (dpo, {"logprobs": 1, "ref_logprobs": 1, "chosen_mask": 1, "rejected_mask": 1, "beta": 0}),
    "weighted_nll": (weighted_nll, {"logprobs": 1, "weights": 1}),
    "soft_targets": (soft_targets, {"logprobs": 2, "probs": 2}),
}


def definition(name: str) -> dict:
    """The CreateCustomLossRequest fields of a case (name, inputs, graph), as JSON."""
    fn, ranks = CASES[name]
    handle = trace_loss(fn, ranks, "s")
    return {"name": handle.name, "inputs": [i.model_dump() for i in handle.inputs],
            "graph": encode_graph(handle).model_dump(mode="json")}
