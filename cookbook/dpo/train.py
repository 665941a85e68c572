"""DPO with `forward_backward_custom`: prefer short correct answers to arithmetic questions over padded
or wrong ones.

    python -m cookbook.dpo.train [base_url=http://127.0.0.1:8000] [epochs=2] [beta=0.1] ...

Pairs are generated: the question is "What is a + b?" (or -, *), the chosen answer "The answer is c.",
the rejected one either the same correct number wrapped in chatty padding ("verbose") or a concise but
wrong number ("wrong"). The reference logprobs come from one forward pass of the starting model. The
held-out metric is preference accuracy: the fraction of unseen pairs whose implicit reward margin
(logp_c - ref_c) - (logp_r - ref_r) is positive (0.5 = chance; the start is exactly 0 margin).
"""

from __future__ import annotations

import dataclasses
import json
import random

import torch
from tinker import types
from tqdm import tqdm

from cookbook.common import (BaseConfig, MetricsLogger, completion_tokens, decode, log_dir_for, messages,
                             parse_config, prompt_tokens, sample_all, service_client, sft_datum, stop_params)

OPENERS = ["Great question! ", "Sure, I'd be happy to help with that. ", "Of course! Let's think about it. ",
           "What a fun little problem! "]
MIDDLES = ["If we take {a} and {verb} {b}, we get {c}. ", "Working it out step by step, the result is {c}. ",
           "After doing the calculation carefully, I find that the answer is {c}. "]
CLOSERS = ["I hope this helps!", "Let me know if you have any other questions.",
           "Feel free to ask if you need anything else!"]
OPS = {"+": ("add", lambda a, b: a + b), "-": ("subtract", lambda a, b: a - b), "*": ("multiply by", lambda a, b: a * b)}


@dataclasses.dataclass
class Config(BaseConfig):
    num_train: int = 256  # pairs
    num_test: int = 64
    epochs: int = 2
    batch_size: int = 16  # pairs per step
    beta: float = 0.5
    learning_rate: float = 2e-4
    eval_every: int = 8
    max_steps: int | None = None
    num_examples: int = 4  # held-out questions answered greedily before/after (0 = skip)


def make_pairs(rng: random.Random, n: int, seen: set) -> list[dict]:
    pairs = []
    while len(pairs) < n:
        op = rng.choice(list(OPS))
        a, b = rng.randint(2, 30), rng.randint(2, 12 if op == "*" else 30)
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        verb, fn = OPS[op]
        c = fn(a, b)
        kind = "verbose" if len(pairs) % 2 == 0 else "wrong"
        if kind == "verbose":
            rejected = rng.choice(OPENERS) + rng.choice(MIDDLES).format(a=a, b=b, c=c, verb=verb) + rng.choice(CLOSERS)
        else:
            rejected = f"The answer is {c + rng.choice([-10, -2, -1, 1, 2, 10])}."
        pairs.append({"question": f"What is {a} {op} {b}?", "chosen": f"The answer is {c}.", "rejected": rejected,
                      "kind": kind})
    return pairs


def to_data(tokenizer, pairs: list[dict]) -> list[types.Datum]:
    """Two datums per pair, chosen then rejected; weights 1 on the answer tokens."""
    data = []
    for p in pairs:
        prompt = prompt_tokens(tokenizer, messages(p["question"]))
        data += [sft_datum(prompt, completion_tokens(tokenizer, p[k])) for k in ("chosen", "rejected")]
    return data


def sequence_logprobs(logprobs_list, data) -> torch.Tensor:
    """Σ over the answer tokens of each datum's logprob (works on tensors with or without grad)."""
    return torch.stack([(torch.as_tensor(lp) * d.loss_fn_inputs["weights"].to_torch()).sum()
                        for lp, d in zip(logprobs_list, data)])


def forward_logprobs(training, data) -> torch.Tensor:
    out = training.forward(data, "cross_entropy").result().loss_fn_outputs
    return sequence_logprobs([o["logprobs"].to_torch() for o in out], data)


def greedy_answers(training, tokenizer, questions: list[str]) -> list[str]:
    sampler = training.save_weights_and_get_sampling_client().result()
    prompts = [prompt_tokens(tokenizer, messages(q)) for q in questions]
    results = sample_all(sampler, prompts, stop_params(tokenizer, max_tokens=48, temperature=0.0))
    return [decode(tokenizer, seqs[0].tokens) for seqs in results]


def margins(seq_logprobs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Implicit reward margin per pair: (logp_c - ref_c) - (logp_r - ref_r)."""
    rewards = seq_logprobs - reference
    return rewards[0::2] - rewards[1::2]


def main(config: Config) -> dict:
    log_dir = log_dir_for(config, "dpo")
    rng, seen = random.Random(config.seed), set()
    test_pairs = make_pairs(rng, config.num_test, seen)
    train_pairs = make_pairs(rng, config.num_train, seen)  # `seen` keeps every test question out of training
    with service_client(config, log_dir) as service:
        training = service.create_lora_training_client(base_model=config.base_model, rank=config.rank,
                                                       seed=config.seed).result()
        tokenizer = training.get_tokenizer()
        train_data, test_data = to_data(tokenizer, train_pairs), to_data(tokenizer, test_pairs)
        # The fresh adapter is the starting model: one forward pass gives every reference logprob.
        train_ref, test_ref = forward_logprobs(training, train_data), forward_logprobs(training, test_data)
        shown = [p["question"] for p in test_pairs[:config.num_examples]]
        before = greedy_answers(training, tokenizer, shown)
        kinds = [p["kind"] for p in test_pairs]

        def evaluate() -> dict:
            rewards = forward_logprobs(training, test_data) - test_ref
            m = rewards[0::2] - rewards[1::2]
            out = {"test_pref_acc": float((m > 0).float().mean()), "test_margin": float(m.mean()),
                   "test_chosen_reward": float(rewards[0::2].mean()),
                   "test_rejected_reward": float(rewards[1::2].mean())}
            for kind in ("verbose", "wrong"):
                mask = torch.tensor([k == kind for k in kinds])
                if mask.any():
                    out[f"test_pref_acc_{kind}"] = float((m[mask] > 0).float().mean())
            return out

        logger = MetricsLogger(log_dir, config, plot_name="dpo.png")
        start = evaluate()
        logger.log(0, **start)
        steps_per_epoch = len(train_pairs) // config.batch_size
        total = steps_per_epoch * config.epochs if config.max_steps is None else config.max_steps
        order: list[int] = []
        for step in tqdm(range(1, total + 1), desc="dpo", unit="step"):
            if len(order) < config.batch_size:
                order += rng.sample(range(len(train_pairs)), len(train_pairs))
            idx = order[:config.batch_size]
            del order[:config.batch_size]
            batch = [train_data[2 * i + j] for i in idx for j in (0, 1)]
            ref = torch.stack([train_ref[2 * i + j] for i in idx for j in (0, 1)])

            def dpo_loss(data, logprobs_list):
                m = margins(sequence_logprobs(logprobs_list, data), ref)
                loss = -torch.nn.functional.logsigmoid(config.beta * m).mean()
                return loss, {"dpo_loss:mean": float(loss.detach()),
                              "pref_acc:mean": float((m > 0).float().mean())}

            out = training.forward_backward_custom(batch, dpo_loss).result()
            training.optim_step(types.AdamParams(learning_rate=config.learning_rate, beta1=0.9, beta2=0.95,
                                                 eps=1e-8)).result()
            metrics = {"train_dpo_loss": out.metrics["dpo_loss:mean"],
                       "train_pref_acc": out.metrics["pref_acc:mean"]}
            if step % config.eval_every == 0 or step == total:
                metrics.update(evaluate())
            logger.log(step, **metrics)
        end = {k: v for k, v in logger.rows[-1].items() if k.startswith("test_")}
        logger.close()
        after = greedy_answers(training, tokenizer, shown)

    for q, b, a in zip(shown, before, after):
        print(f"Q (held out): {q}\n  before: {b}\n  after:  {a}")
    summary = {"before": start, "after": end, "test_pairs": len(test_pairs),
               "examples": [{"question": q, "before": b, "after": a} for q, b, a in zip(shown, before, after)]}
    print(json.dumps({k: summary[k] for k in ("before", "after")}, indent=2))
    (log_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main(parse_config(Config))
