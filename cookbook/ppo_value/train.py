"""PPO with a learned value function (a critic LoRA) against the same PPO without one, on continuing
arithmetic sequences with partial credit.

    python -m cookbook.ppo_value.train [base_url=http://127.0.0.1:8000] [steps=30] [gae_lambda=0.95] ...

The prompt is raw text, "Arithmetic sequence: 41, 38, 35, 32,", and the reward is the share of the next
four terms the continuation gets right (position by position). Difficulty varies a lot with the step (-1 is
easy, 4 is hard), so the expected reward depends on the prompt, and once a wrong term is written the rest
is likely wrong too: a value function has something to predict. Two policies train side by side on the
same prompts, one sample per prompt (no groups, so no group-mean baseline):

- `critic`: a second LoRA model is the value head. At every position its next-token logits give
  V = sigmoid(logit(" Yes") - logit(" No")), read with `target_tokens` of shape (N, 2) and trained by binary
  cross-entropy toward the final reward through `forward_backward_custom`. Advantages are GAE(lambda) over
  the sampled tokens, from the values of the critic before its update.
- `nobaseline`: every sampled token's advantage is the reward itself (REINFORCE-style PPO, no baseline).

Both take `minibatches` clipped `ppo` steps per batch. Logged per step: the reward, the variance of the
advantages, the critic's explained variance; every `eval_every` steps: greedy reward on held-out sequences.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re

import numpy as np
import torch
from tinker import types
from tqdm import tqdm

from cookbook.common import BaseConfig, MetricsLogger, adam, log_dir_for, parse_config, rl_datum, service_client

STEPS = (-4, -3, -2, -1, 1, 2, 3, 4, 5, 10)
ARMS = ("critic", "nobaseline")


@dataclasses.dataclass
class Config(BaseConfig):
    steps: int = 40
    batch_size: int = 16  # prompts per step, one sample each
    learning_rate: float = 3e-4
    critic_learning_rate: float = 2e-3
    gae_lambda: float = 1.0  # 1: advantage = reward - V(state), unbiased whatever the critic; < 1 bootstraps
    critic_warmup: int = 10  # critic-only steps on the starting policy's samples before the policies train
    minibatches: int = 2  # ppo optimizer steps per batch (the later ones are off-policy: the clip matters)
    num_terms: int = 4
    max_tokens: int = 20
    num_eval: int = 96  # held-out sequences (start, step), never trained on
    eval_every: int = 5


def sequence_prompt(tokenizer, start: int, step: int) -> list[int]:
    shown = ", ".join(str(start + k * step) for k in range(4))
    return tokenizer.encode(f"Arithmetic sequence: {shown},", add_special_tokens=False)


def reward(text: str, start: int, step: int, num_terms: int) -> float:
    numbers = [int(x) for x in re.findall(r"-?\d+", text)][:num_terms]
    return sum(n == start + (4 + k) * step for k, n in enumerate(numbers)) / num_terms


def rollouts(samplers: dict, tokenizer, problems, temperature: float, seed: int, config: Config) -> dict:
    """One sample per problem from every arm's policy, all requests in flight together (prompt i is sampled
    with seed + i in every arm). Returns {arm: [(prompt, sequence, reward)]}."""
    prompts = [sequence_prompt(tokenizer, a, d) for a, d in problems]
    params = [types.SamplingParams(max_tokens=config.max_tokens, temperature=temperature, seed=seed + i, stop=["\n"])
              for i in range(len(prompts))]
    futures = {arm: [s.sample(types.ModelInput.from_ints(p), 1, sp) for p, sp in zip(prompts, params)]
               for arm, s in samplers.items()}
    return {arm: [(p, f.result().sequences[0], reward(tokenizer.decode(f.result().sequences[0].tokens), a, d,
                                                      config.num_terms))
                  for p, f, (a, d) in zip(prompts, fs, problems)] for arm, fs in futures.items()}


def critic_step(critic, tokenizer, batch, learning_rate: float) -> tuple[list[np.ndarray], float]:
    """One critic update on (prompt, sequence, reward) triples; returns the values *before* the update (one per
    sampled token: V of the state that token was sampled from) and the critic's loss."""
    yes_no = [tokenizer.encode(w, add_special_tokens=False)[0] for w in (" Yes", " No")]
    data = [types.Datum(model_input=types.ModelInput.from_ints(p + list(s.tokens[:-1])),
                        loss_fn_inputs={"target_tokens": [yes_no] * (len(p) + len(s.tokens) - 1)})
            for p, s, _ in batch]
    values: list[np.ndarray] = []

    def value_loss(data, logprobs_list):  # logprobs_list[i]: (N, 2), logprobs of " Yes" and " No" at each position
        losses = []
        for lp, (p, _, r) in zip(logprobs_list, batch):
            logit = lp[len(p) - 1:, 0] - lp[len(p) - 1:, 1]
            values.append(torch.sigmoid(logit).detach().numpy())
            losses.append(torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.full_like(logit, r)))
        loss = torch.stack(losses).mean()
        return loss, {"value_loss": float(loss.detach())}

    fwd = critic.forward_backward_custom(data, value_loss)
    opt = critic.optim_step(adam(learning_rate))
    out, _ = fwd.result(), opt.result()
    return values, out.metrics["value_loss"]


def explained_variance(values: list[np.ndarray], batch) -> float:
    """1 - Var(reward - V(prompt)) / Var(reward): how much of the reward's spread the critic predicts up front."""
    rewards = np.array([r for _, _, r in batch])
    return float(1 - np.var(rewards - [v[0] for v in values]) / max(np.var(rewards), 1e-8))


def gae(values: np.ndarray, final_reward: float, lam: float) -> list[float]:
    """Generalised advantage estimation with gamma = 1 and the only reward at the end."""
    nxt = np.append(values[1:], final_reward)
    advantages, running = [], 0.0
    for delta in reversed(nxt - values):
        running = float(delta) + lam * running
        advantages.append(running)
    return advantages[::-1]


def policy_step(training, data: list[types.Datum], config: Config) -> None:
    k = max(1, min(config.minibatches, len(data)))
    futures = []
    for i in range(k):
        futures.append(training.forward_backward(data[i::k], "ppo"))
        futures.append(training.optim_step(adam(config.learning_rate)))
    for f in futures:
        f.result()


def main(config: Config) -> dict:
    log_dir = log_dir_for(config, "ppo_value")
    rng = random.Random(config.seed)
    pool = [(a, d) for d in STEPS for a in range(30, 60)]
    rng.shuffle(pool)
    held_out, train = pool[:config.num_eval], pool[config.num_eval:]
    with service_client(config, log_dir) as service:
        new_client = lambda: service.create_lora_training_client(  # noqa: E731
            base_model=config.base_model, rank=config.rank, seed=config.seed).result()
        policies, critic = {arm: new_client() for arm in ARMS}, new_client()
        tokenizer = critic.get_tokenizer()
        samplers = {arm: t.save_weights_and_get_sampling_client().result() for arm, t in policies.items()}
        logger = MetricsLogger(log_dir, config, plot_name="ppo_value.png")

        def evaluate(greedy: bool = False) -> dict:  # temperature 1 with fixed seeds (and greedy at start and end)
            m = {}
            for name, t in [("test_reward", 1.0)] + [("test_greedy", 0.0)] * greedy:
                out = rollouts(samplers, tokenizer, held_out, t, 0, config)
                m.update({f"{name}_{arm}": float(np.mean([r for _, _, r in rows])) for arm, rows in out.items()})
            return m

        for step in tqdm(range(1 - config.critic_warmup, 1), desc="critic warmup", unit="step"):
            batch = rollouts({"critic": samplers["critic"]}, tokenizer, [rng.choice(train) for _ in
                             range(config.batch_size)], 1.0, rng.randrange(2**31), config)["critic"]
            values, value_loss = critic_step(critic, tokenizer, batch, config.critic_learning_rate)
            logger.log(step, value_loss=value_loss, critic_explained_var=explained_variance(values, batch))
        start = evaluate(greedy=True)
        logger.log(0, **start)
        for step in tqdm(range(1, config.steps + 1), desc="ppo", unit="step"):
            problems = [rng.choice(train) for _ in range(config.batch_size)]
            batches = rollouts(samplers, tokenizer, problems, 1.0, rng.randrange(2**31), config)
            values, value_loss = critic_step(critic, tokenizer, batches["critic"], config.critic_learning_rate)
            advantages = {"critic": [gae(v, r, config.gae_lambda) for v, (_, _, r) in zip(values, batches["critic"])],
                          "nobaseline": [[r] * len(s.tokens) for _, s, r in batches["nobaseline"]]}
            metrics = {"value_loss": value_loss, "critic_explained_var": explained_variance(values, batches["critic"])}
            for arm in ARMS:
                flat = np.concatenate([np.asarray(a, dtype=float) for a in advantages[arm]])
                metrics[f"train_reward_{arm}"] = np.mean([r for _, _, r in batches[arm]])
                metrics[f"adv_var_{arm}"] = np.var(flat)
                data = [rl_datum(p, s.tokens, s.logprobs, a) for (p, s, _), a in zip(batches[arm], advantages[arm])]
                policy_step(policies[arm], data, config)
                samplers[arm] = policies[arm].save_weights_and_get_sampling_client().result()
            if step % config.eval_every == 0 or step == config.steps:
                metrics.update(evaluate(greedy=step == config.steps))
            logger.log(step, **metrics)
        end = {k: v for k, v in logger.rows[-1].items() if k.startswith("test_")}
        logger.close({"held-out reward (T=1)": [f"test_reward_{a}" for a in ARMS],
                      "train reward (T=1)": [f"train_reward_{a}" for a in ARMS],
                      "advantage variance": [f"adv_var_{a}" for a in ARMS],
                      "critic": ["critic_explained_var", "value_loss"]})
    mean_var = {arm: float(np.mean([r[f"adv_var_{arm}"] for r in logger.rows if f"adv_var_{arm}" in r])) for arm in ARMS}
    summary = {"before": start, "after": end, "mean_adv_var": mean_var,
               "held_out_sequences": len(held_out), "wall_time_s": logger.rows[-1]["elapsed_s"]}
    print(json.dumps(summary, indent=2))
    (log_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main(parse_config(Config))
