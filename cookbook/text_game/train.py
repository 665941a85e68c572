"""RL on a multi-turn text adventure: the policy learns to find the key and open the chest within a turn budget.

    python -m cookbook.text_game.train [base_url=http://127.0.0.1:8000] [steps=8] [games_per_step=8] ...

The game is `env.TextGame` (rooms, a key, a locked chest; text observations, short commands, deterministic
under a seed). Each turn the policy sees the current observation under a system prompt stating the goal and
replies with a command (at most `max_tokens` tokens, after the prefilled "I will ": without it the base model
names a command in 2 % of its replies, with it in 30 %). Every step plays `group_size` episodes on each of
`games_per_step` fresh maps (all episodes in lockstep; episodes that see the same observation share one
`sample` request with one sample each), scores each episode by its return (0.5 for taking the key, 1 when
the chest opens, minus `turn_cost` per turn), centres it within the episodes of the same map, and gives that advantage to every
command of the episode in one `importance_sampling` step. Held-out maps are played greedily before training
and every `eval_every` steps, next to a random player (uniform over the listed commands) and the scripted
optimal player (shortest plan on the known map): the two ends of the plot.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import defaultdict

from tinker import types
from tqdm import tqdm

from cookbook.common import (BaseConfig, MetricsLogger, adam, decode, log_dir_for, messages, parse_config,
                             prompt_tokens, rl_datum, service_client, stop_params)
from cookbook.text_game.env import GOAL, TextGame

REPLY_PREFIX = "I will "


@dataclasses.dataclass
class Config(BaseConfig):
    steps: int = 8
    games_per_step: int = 8  # fresh maps per step
    group_size: int = 4  # episodes per map
    learning_rate: float = 5e-4
    turn_cost: float = 0.02  # prefer short wins among the episodes of a map
    max_turns: int = 10
    num_rooms: int = 4
    max_tokens: int = 6
    num_eval: int = 30  # held-out maps (seeds never trained on)
    eval_every: int = 4


@dataclasses.dataclass
class Episode:
    game: TextGame
    observation: str
    turns: list = dataclasses.field(default_factory=list)  # (prompt, tokens, logprobs) per command
    reward: float = 0.0


def play(sampler, tokenizer, episodes: list[Episode], temperature: float, max_tokens: int, rng: random.Random):
    """Play every episode to its end, one turn of all active episodes at a time."""
    while active := [e for e in episodes if not e.game.done]:
        waiting = defaultdict(list)
        for e in active:
            waiting[e.observation].append(e)
        params = stop_params(tokenizer, max_tokens, temperature, seed=rng.randrange(2**31))
        prompts = {obs: prompt_tokens(tokenizer, messages(obs, system=GOAL))
                   + tokenizer.encode(REPLY_PREFIX, add_special_tokens=False) for obs in waiting}
        futures = {obs: sampler.sample(types.ModelInput.from_ints(prompts[obs]), len(es), params)
                   for obs, es in waiting.items()}
        for obs, es in waiting.items():
            for e, seq in zip(es, futures[obs].result().sequences):
                e.turns.append((prompts[obs], seq.tokens, seq.logprobs))
                e.observation, reward, _ = e.game.step(decode(tokenizer, seq.tokens))
                e.reward += reward
    return episodes


def scripted_success(seeds, config: Config, choose) -> float:
    """Success rate of a player given as a function (game) -> command."""
    wins = 0
    for seed in seeds:
        game = TextGame(seed, config.num_rooms, config.max_turns)
        while not game.done:
            game.step(choose(game))
        wins += game.won
    return wins / len(seeds)


def main(config: Config) -> dict:
    log_dir = log_dir_for(config, "text_game")
    rng = random.Random(config.seed)
    held_out = [10**6 + i for i in range(config.num_eval)]  # training maps use seeds below 10**6
    new_game = lambda seed: TextGame(seed, config.num_rooms, config.max_turns)  # noqa: E731
    random_player = random.Random(7)
    reference = {"random": scripted_success(held_out, config, lambda g: g.random_action(random_player)),
                 "optimal": scripted_success(held_out, config, TextGame.optimal_action)}
    with service_client(config, log_dir) as service:
        training = service.create_lora_training_client(base_model=config.base_model, rank=config.rank,
                                                       seed=config.seed).result()
        tokenizer = training.get_tokenizer()
        sampler = training.save_weights_and_get_sampling_client().result()  # fresh adapter == base model
        logger = MetricsLogger(log_dir, config, plot_name="text_game.png")

        def evaluate(sampler) -> dict:
            episodes = [Episode(g, g.reset()) for g in map(new_game, held_out)]
            play(sampler, tokenizer, episodes, 0.0, config.max_tokens, random.Random(0))
            return {"eval_success": sum(e.game.won for e in episodes) / len(episodes),
                    "eval_key_taken": sum(e.game.key_at is None for e in episodes) / len(episodes),
                    "eval_turns": sum(len(e.turns) for e in episodes) / len(episodes),
                    "random_player": reference["random"], "optimal_player": reference["optimal"]}

        start = evaluate(sampler)
        logger.log(0, **start)
        for step in tqdm(range(1, config.steps + 1), desc="text_game", unit="step"):
            seeds = [rng.randrange(10**6) for _ in range(config.games_per_step)]
            groups = [[Episode(g, g.reset()) for g in map(new_game, [seed] * config.group_size)] for seed in seeds]
            play(sampler, tokenizer, [e for g in groups for e in g], 1.0, config.max_tokens, rng)
            merged: dict = {}  # the loss is linear in the advantage: identical (prompt, reply) pairs add up
            for group in groups:
                returns = [e.reward - config.turn_cost * len(e.turns) for e in group]
                mean = sum(returns) / len(returns)
                for e, ret in zip(group, returns):
                    for prompt, tokens, logprobs in e.turns:
                        key = (tuple(prompt), tuple(tokens))
                        merged[key] = (logprobs, merged.get(key, (None, 0.0))[1] + ret - mean)
            data = [rl_datum(list(p), list(t), lps, adv) for (p, t), (lps, adv) in merged.items() if abs(adv) > 1e-9]
            if data:
                fwd = training.forward_backward(data, "importance_sampling")
                opt = training.optim_step(adam(config.learning_rate))
                fwd.result(), opt.result()
            sampler = training.save_weights_and_get_sampling_client().result()
            episodes = [e for g in groups for e in g]
            metrics = {"train_success": sum(e.game.won for e in episodes) / len(episodes),
                       "train_key_taken": sum(e.game.key_at is None for e in episodes) / len(episodes),
                       "train_turns": sum(len(e.turns) for e in episodes) / len(episodes), "datums": len(data)}
            if step % config.eval_every == 0 or step == config.steps:
                metrics.update(evaluate(sampler))
            logger.log(step, **metrics)
        end = {k: v for k, v in logger.rows[-1].items() if k.startswith("eval_")}
        logger.close({"success rate (held-out maps)": ["train_success", "eval_success", "random_player",
                                                       "optimal_player"],
                      "key taken": ["train_key_taken", "eval_key_taken"],
                      "turns per episode": ["train_turns", "eval_turns"]})
        game = new_game(held_out[0])
        example = play(sampler, tokenizer, [Episode(game, game.reset())], 0.0, config.max_tokens, random.Random(0))[0]
    transcript = [decode(tokenizer, tokens) for _, tokens, _ in example.turns]
    print(f"held-out map {held_out[0]}: {transcript} -> reward {example.reward}")
    summary = {"before": start, "after": end, "reference": reference, "held_out_maps": len(held_out),
               "example_commands": transcript, "wall_time_s": logger.rows[-1]["elapsed_s"]}
    print(json.dumps(summary, indent=2))
    (log_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main(parse_config(Config))
