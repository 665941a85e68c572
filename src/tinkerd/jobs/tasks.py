"""What each kind of job trains and measures, built from the cookbook recipes' own functions.

A task holds its tokenised rows (`tokens()`: tokens per training example, for the planner, which then sets
`task.plan`) and offers `step(training, rows, lr)` (one optimizer step on those training rows,
returning train metrics) and `evaluate(training)` (the held-out metric `metric`, plus companions). `better` says
which way the metric should move.

- sft (cookbook/sft): cross-entropy on the reply tokens; held-out NLL per reply token (lower is better).
- dpo (cookbook/dpo): the DPO loss through `forward_backward_custom` against reference logprobs of the starting
  adapter (which is the base model); held-out preference accuracy, margin > 0 (higher is better), margin kept too.
  The reference logprobs are part of the resume state, so a resumed job compares with the same reference.
- rl (cookbook/rl_math, rl_grader): `group_size` answers per prompt at temperature 1, graded, advantages centred
  within the group, one `importance_sampling` step; held-out pass rate greedy and at temperature 1 (their mean is
  the metric; higher is better).
"""

from __future__ import annotations

import torch

from cookbook.common import (adam, completion_tokens, decode, grpo_data, prompt_tokens, sample_all, sft_datum,
                             stop_params)
from cookbook.dpo.train import margins, sequence_logprobs
from cookbook.sft.train import nll_per_token
from tinkerd.jobs.graders import Grader

EVAL_SEED = 1234  # the same temperature-1 evaluation samples before and after, and after a resume


class SFTTask:
    metric, better = "held_out_nll", "lower"

    def __init__(self, tokenizer, train_rows, held_rows, plan, state: dict, **_) -> None:
        def datum(row):
            return sft_datum(prompt_tokens(tokenizer, row["messages"]), completion_tokens(tokenizer, row["completion"]))
        self.train, self.held = [datum(r) for r in train_rows], [datum(r) for r in held_rows]

    def tokens(self) -> list[int]:
        return [d.model_input.length + 1 for d in self.train]

    def step(self, training, idx: list[int], lr: float) -> dict:
        batch = [self.train[i] for i in idx]
        fwd = training.forward_backward(batch, "cross_entropy")
        opt = training.optim_step(adam(lr))
        out = {"train_nll": nll_per_token(fwd.result().loss_fn_outputs, batch)}
        opt.result()
        return out

    def evaluate(self, training) -> dict:
        return {"held_out_nll": nll_per_token(training.forward(self.held, "cross_entropy").result().loss_fn_outputs,
                                              self.held)}


class DPOTask:
    metric, better = "held_out_pref_acc", "higher"

    def __init__(self, tokenizer, train_rows, held_rows, plan, state: dict, training=None, **_) -> None:
        def pair(r):
            prompt = prompt_tokens(tokenizer, r["messages"])
            return [sft_datum(prompt, completion_tokens(tokenizer, r[k])) for k in ("chosen", "rejected")]
        self.train = [d for r in train_rows for d in pair(r)]
        self.held = [d for r in held_rows for d in pair(r)]
        self.plan = plan
        if "reference" not in state:  # the fresh adapter is the base model: its logprobs are the reference
            state["reference"] = {"train": self._logprobs(training, self.train).tolist(),
                                  "held": self._logprobs(training, self.held).tolist()}
        self.ref_train = torch.tensor(state["reference"]["train"])
        self.ref_held = torch.tensor(state["reference"]["held"])

    @staticmethod
    def _logprobs(training, data) -> torch.Tensor:
        out = training.forward(data, "cross_entropy").result().loss_fn_outputs
        return sequence_logprobs([o["logprobs"].to_torch() for o in out], data)

    def tokens(self) -> list[int]:
        return [self.train[2 * i].model_input.length + self.train[2 * i + 1].model_input.length
                for i in range(len(self.train) // 2)]

    def step(self, training, idx: list[int], lr: float) -> dict:
        batch = [self.train[2 * i + j] for i in idx for j in (0, 1)]
        ref = torch.stack([self.ref_train[2 * i + j] for i in idx for j in (0, 1)])

        def dpo_loss(data, logprobs_list):
            m = margins(sequence_logprobs(logprobs_list, data), ref)
            loss = -torch.nn.functional.logsigmoid(self.plan["beta"] * m).mean()
            return loss, {"dpo_loss:mean": float(loss.detach()), "pref_acc:mean": float((m > 0).float().mean())}

        out = training.forward_backward_custom(batch, dpo_loss).result()
        training.optim_step(adam(lr)).result()
        return {"train_dpo_loss": out.metrics["dpo_loss:mean"], "train_pref_acc": out.metrics["pref_acc:mean"]}

    def evaluate(self, training) -> dict:
        m = margins(self._logprobs(training, self.held), self.ref_held)
        return {"held_out_pref_acc": float((m > 0).float().mean()), "held_out_margin": float(m.mean())}


class RLTask:
    metric, better = "held_out_pass_rate", "higher"

    def __init__(self, tokenizer, train_rows, held_rows, plan, state: dict, service=None, grader=None,
                 base_model=None, **_) -> None:
        self.tokenizer, self.plan = tokenizer, plan
        self.train = [(prompt_tokens(tokenizer, r["messages"]), r["reference"]) for r in train_rows]
        self.held = [(prompt_tokens(tokenizer, r["messages"]), r["reference"]) for r in held_rows]
        self.grader = Grader(grader, service, base_model, tokenizer)

    def tokens(self) -> list[int]:
        return [len(p) for p, _ in self.train]

    def _graded(self, sampler, rows, temperature: float, n: int, seed: int):
        params = stop_params(self.tokenizer, self.plan["max_tokens"], temperature, seed=seed)
        groups = sample_all(sampler, [p for p, _ in rows], params, n)
        replies = [[decode(self.tokenizer, s.tokens) for s in seqs] for seqs in groups]
        flat = self.grader.rewards([r for rs in replies for r in rs],
                                   [ref for (_, ref), rs in zip(rows, replies) for _ in rs])
        return groups, [flat[i * n:(i + 1) * n] for i in range(len(rows))]

    def step(self, training, idx: list[int], lr: float, seed: int = 0) -> dict:
        rows = [self.train[i] for i in idx]
        sampler = training.save_weights_and_get_sampling_client().result()
        groups, rewards = self._graded(sampler, rows, 1.0, self.plan["group_size"], seed)
        data = grpo_data([p for p, _ in rows], groups, rewards)
        if data:
            fwd = training.forward_backward(data, "importance_sampling")
            opt = training.optim_step(adam(lr))
            fwd.result(), opt.result()
        flat = [r for rs in rewards for r in rs]
        return {"train_reward": sum(flat) / len(flat), "groups_with_signal": len(data) / len(flat)}

    def evaluate(self, training) -> dict:
        sampler = training.save_weights_and_get_sampling_client().result()
        n = self.plan["eval_samples"]
        _, greedy = self._graded(sampler, self.held, 0.0, 1, EVAL_SEED)
        _, warm = self._graded(sampler, self.held, 1.0, n, EVAL_SEED)
        rate = lambda groups, k: sum(r > 0.5 for rs in groups for r in rs) / (k * len(self.held))
        out = {"held_out_pass_rate_greedy": rate(greedy, 1), "held_out_pass_rate_t1": rate(warm, n)}
        out["held_out_pass_rate"] = (out["held_out_pass_rate_greedy"] + out["held_out_pass_rate_t1"]) / 2
        return out


TASKS = {"sft": SFTTask, "dpo": DPOTask, "rl": RLTask}
