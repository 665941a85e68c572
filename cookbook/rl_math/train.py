"""GRPO-style RL with a verifier: the model learns to answer addition problems with the right number.

    python -m cookbook.rl_math.train [base_url=http://127.0.0.1:8000] [steps=40] [group_size=8] ...

Every step: draw `problems_per_step` random problems "What is a + b?", sample `group_size` answers to
each at temperature 1 from the current weights, reward 1 when the last number in the answer is a + b,
centre the rewards within each group (advantage = reward - group mean) and take one
`importance_sampling` step on the sampled tokens. A fixed held-out set of problems (never trained on) is
answered greedily before training and every `eval_every` steps.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re

from tinker import types
from tqdm import tqdm

from cookbook.common import (BaseConfig, MetricsLogger, decode, grpo_data, log_dir_for, messages, parse_config,
                             prompt_tokens, sample_all, service_client, stop_params)

SYSTEM = "You are a calculator. Reply with only the final number."


@dataclasses.dataclass
class Config(BaseConfig):
    steps: int = 60
    problems_per_step: int = 16
    group_size: int = 8
    learning_rate: float = 5e-4
    max_tokens: int = 24  # answers are cut here (and then usually wrong): brevity is learned too
    min_operand: int = 10
    max_operand: int = 99
    num_eval: int = 100  # held-out problems
    eval_samples: int = 4  # temperature-1 answers per held-out problem (at the start and the end)
    eval_every: int = 5


def make_problem(rng: random.Random, config: Config) -> tuple[int, int]:
    return rng.randint(config.min_operand, config.max_operand), rng.randint(config.min_operand, config.max_operand)


def reward(text: str, a: int, b: int) -> float:
    """Exact match on the last integer of the reply."""
    numbers = re.findall(r"-?\d+", text.replace(",", ""))
    return float(bool(numbers) and int(numbers[-1]) == a + b)


def problem_prompt(tokenizer, a: int, b: int) -> list[int]:
    return prompt_tokens(tokenizer, messages(f"What is {a} + {b}?", system=SYSTEM))


def accuracy(sampler, tokenizer, problems, temperature: float, num_samples: int, max_tokens: int) -> float:
    prompts = [problem_prompt(tokenizer, a, b) for a, b in problems]
    results = sample_all(sampler, prompts, stop_params(tokenizer, max_tokens, temperature, seed=1234), num_samples)
    scores = [reward(decode(tokenizer, s.tokens), a, b) for (a, b), seqs in zip(problems, results) for s in seqs]
    return sum(scores) / len(scores)


def main(config: Config) -> dict:
    log_dir = log_dir_for(config, "rl_math")
    rng = random.Random(config.seed)
    held_out = sorted({make_problem(rng, config) for _ in range(10 * config.num_eval)})
    held_out = rng.sample(held_out, min(config.num_eval, len(held_out)))
    excluded = set(held_out)
    with service_client(config, log_dir) as service:
        training = service.create_lora_training_client(base_model=config.base_model, rank=config.rank,
                                                       seed=config.seed).result()
        tokenizer = training.get_tokenizer()
        logger = MetricsLogger(log_dir, config, plot_name="rl_math.png")
        sampler = training.save_weights_and_get_sampling_client().result()  # fresh adapter == base model

        def evaluate(sampler, with_temperature: bool) -> dict:
            m = {"eval_greedy_acc": accuracy(sampler, tokenizer, held_out, 0.0, 1, config.max_tokens)}
            if with_temperature:
                m["eval_t1_acc"] = accuracy(sampler, tokenizer, held_out, 1.0, config.eval_samples, config.max_tokens)
            return m

        start = evaluate(sampler, with_temperature=True)
        logger.log(0, **start)
        for step in tqdm(range(1, config.steps + 1), desc="rl", unit="step"):
            problems = []
            while len(problems) < config.problems_per_step:
                p = make_problem(rng, config)
                if p not in excluded:
                    problems.append(p)
            prompts = [problem_prompt(tokenizer, a, b) for a, b in problems]
            params = stop_params(tokenizer, config.max_tokens, temperature=1.0, seed=rng.randrange(2**31))
            groups = sample_all(sampler, prompts, params, num_samples=config.group_size)

            scores = [[reward(decode(tokenizer, s.tokens), a, b) for s in seqs] for (a, b), seqs in zip(problems, groups)]
            data = grpo_data(prompts, groups, scores)  # groups that all scored the same carry no signal
            rewards = [r for rs in scores for r in rs]
            lengths = [len(s.tokens) for seqs in groups for s in seqs]
            metrics = {"train_reward": sum(rewards) / len(rewards), "answer_tokens": sum(lengths) / len(lengths),
                       "groups_with_signal": len(data) / config.group_size / len(problems)}
            if data:
                fwd = training.forward_backward(data, "importance_sampling")
                opt = training.optim_step(types.AdamParams(learning_rate=config.learning_rate, beta1=0.9,
                                                           beta2=0.95, eps=1e-8))
                fwd.result(), opt.result()
            sampler = training.save_weights_and_get_sampling_client().result()  # new weights, no file written
            if step % config.eval_every == 0 or step == config.steps:
                metrics.update(evaluate(sampler, with_temperature=step == config.steps))
            logger.log(step, **metrics)
        end = {k: v for k, v in logger.rows[-1].items() if k.startswith("eval_")}
        logger.close()

        examples = sample_all(sampler, [problem_prompt(tokenizer, a, b) for a, b in held_out[:5]],
                              stop_params(tokenizer, config.max_tokens, 0.0))
        for (a, b), seqs in zip(held_out[:5], examples):
            print(f"{a} + {b} -> {decode(tokenizer, seqs[0].tokens)!r}")
    summary = {"before": start, "after": end, "held_out_problems": len(held_out)}
    print(json.dumps(summary, indent=2))
    (log_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main(parse_config(Config))
