"""The choices a careful researcher would make for a job, from the data and the model, each with its reason.

`held_out_split` picks the evaluation rows; `make_plan` picks learning rate, batch, steps, evaluation cadence and
early stopping from the row count, the mean tokens per training example (a dpo pair: both its sequences), the model's hidden size, the kind and the budget.
A user's hyperparameter overrides the choice. Pure arithmetic: no tokenizer, no model, no clock (the runner
measures the rows and enforces a minutes budget).

Where the rules come from:
- learning rate: Tinker's documented LoRA rule LR = 5e-5 x 10 x (2000 / hidden_size) ** 0.781 (tinker-cookbook
  `hyperparam_utils.get_lr`, the Llama exponent; SmolLM2 is a Llama). It does not depend on the LoRA rank because
  the adapter is scaled by alpha / rank (Thinking Machines, "LoRA Without Regret": the best LR is nearly
  rank-independent under that scaling). For SmolLM2-135M (hidden 576) that is 1.3e-3, next to the 1e-3 the sft
  recipe measured best; dpo and rl take the fractions of it the cookbook's dpo (2e-4) and rl_math / rl_grader
  (5e-4 / 3e-4) recipes use on the same model.
- batch: about `TOKENS_PER_STEP` tokens per step (a forward_backward of that size is ~1 s of this 2-core CPU and
  the cookbook's sft batches of 16 short chats are ~1k tokens), between 4 and 32 rows.
- steps: `EPOCHS[kind]` passes over the training rows (the cookbook's sft needed ~5-8, dpo 2), or the budget's
  steps if fewer; evaluation about 8 times over the run; early stop after `PATIENCE` evaluations without a
  better held-out metric; the best evaluation's checkpoint is the result.
"""

from __future__ import annotations

import math
import random

HELD_OUT_FRACTION, MIN_HELD_OUT = 0.10, 20
TOKENS_PER_STEP = 1024
EPOCHS = {"sft": 4.0, "dpo": 2.0, "rl": 2.0}
LR_SHARE = {"sft": 1.0, "dpo": 0.15, "rl": 0.3}
PATIENCE = 3
EVALS_PER_RUN = 8
RL_GROUP, RL_MAX_TOKENS, RL_EVAL_SAMPLES = 4, 48, 2


def held_out_split(n: int, seed: int, fraction: float = HELD_OUT_FRACTION) -> tuple[list[int], list[int]]:
    """(train, held_out) row indices: `fraction` of the rows (at least 20) drawn with `seed`, the rest trained on."""
    k = max(MIN_HELD_OUT, round(fraction * n))
    order = random.Random(seed).sample(range(n), n)
    return sorted(order[k:]), sorted(order[:k])


def lora_learning_rate(hidden_size: int, kind: str) -> float:
    return 5e-5 * 10 * (2000 / hidden_size) ** 0.781 * LR_SHARE[kind]


def make_plan(kind: str, train_rows: int, held_out_rows: int, mean_tokens: float, hidden_size: int,
              budget: dict, overrides: dict) -> dict:
    """Every number the runner uses, and `reasons`: one sentence per choice, shown to the user."""
    o = dict(overrides)
    reasons = {}
    rank = o.get("rank", 16)
    lr = o.get("learning_rate") or lora_learning_rate(hidden_size, kind)
    reasons["learning_rate"] = ("set by you" if "learning_rate" in o else
                                f"5e-5 x 10 x (2000/{hidden_size})^0.781 x {LR_SHARE[kind]} (Tinker's LoRA rule, "
                                f"{kind} share from the cookbook)")
    group = o.get("group_size", RL_GROUP)
    max_tokens = o.get("max_tokens", RL_MAX_TOKENS)
    per_example = mean_tokens + (group * max_tokens if kind == "rl" else 0)  # dpo: a pair's two sequences
    batch = o.get("batch_size") or max(2 if kind == "rl" else 4, min(32, round(TOKENS_PER_STEP / per_example)))
    batch = min(batch, train_rows)
    reasons["batch_size"] = "set by you" if "batch_size" in o else (
        f"~{TOKENS_PER_STEP} tokens per step at ~{per_example:.0f} tokens per "
        f"{'prompt group' if kind == 'rl' else 'example'}")
    epochs = o.get("epochs", EPOCHS[kind])
    steps = max(1, math.ceil(epochs * train_rows / batch))
    reasons["steps"] = f"{epochs:g} passes over {train_rows} training rows at {batch} per step"
    if budget.get("steps") is not None and budget["steps"] < steps:
        steps = budget["steps"]
        reasons["steps"] = f"the budget's {steps} steps (fewer than {epochs:g} passes over the data)"
    if budget.get("minutes") is not None:
        reasons["steps"] += f"; stops earlier if {budget['minutes']:g} minutes run out"
    eval_every = o.get("eval_every") or max(1, round(steps / EVALS_PER_RUN))
    reasons["eval_every"] = "set by you" if "eval_every" in o else f"about {EVALS_PER_RUN} evaluations over the run"
    plan = {"kind": kind, "rank": rank, "learning_rate": lr, "batch_size": batch, "steps": steps,
            "eval_every": eval_every, "patience": o.get("patience", PATIENCE), "seed": o.get("seed", 0),
            "train_rows": train_rows, "held_out_rows": held_out_rows, "mean_tokens": round(mean_tokens, 1),
            "schedule": "linear decay to 0 over the planned steps"}
    if kind == "dpo":
        plan["beta"] = o.get("beta", 0.5)
        reasons["beta"] = "set by you" if "beta" in o else "0.5, the cookbook dpo recipe's"
    if kind == "rl":
        plan.update(group_size=group, max_tokens=max_tokens, eval_samples=o.get("eval_samples", RL_EVAL_SAMPLES))
        reasons["group_size"] = (f"{group} answers per prompt, rewards centred within the group (GRPO-style, "
                                 "as the cookbook rl recipes)")
    plan["reasons"] = reasons
    return plan


def batch_indices(step: int, n: int, batch: int, seed: int) -> list[int]:
    """The training rows of `step` (1-based): consecutive slices of one shuffled order per epoch, a pure function
    of (seed, step), so a job resumed at any step trains on the rows an uninterrupted one would have."""
    start, out = (step - 1) * batch, []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        order = random.Random(seed * 7919 + epoch).sample(range(n), n)
        out += order[offset:offset + batch - len(out)]
    return out
