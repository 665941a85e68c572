"""RL on a multi-turn text adventure: the policy learns to find the key and open the chest within a turn budget.

    python -m cookbook.text_game.train [base_url=http://127.0.0.1:8000] [steps=8] [games_per_step=3] [seed=0] ...

The game is `env.TextGame` (deterministic under a seed); its observations list the commands that do something,
numbered. Each turn the policy sees the observation under a system prompt stating the goal and replies with a
number: one token after the prefilled "I choose command " (a reply that is not a listed number wastes the
turn). Every step plays `group_size` episodes on each of `games_per_step` fresh maps in lockstep (episodes that
see the same observation share one `sample` request). Each command is scored by its reward to go (0.5 for the
key, 1 for the chest, `shaping` per command of progress along the optimal plan, minus `turn_cost` per command),
centred over the map's episodes at the same turn; every (observation, reply) pair is trained on, in one
`importance_sampling` step per step. Held-out games are played greedily and at temperature 1 before and after
training, next to a random player and the scripted optimal player: the plot's two ends.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import defaultdict
from itertools import accumulate

from tinker import types
from tqdm import tqdm

from cookbook.common import (BaseConfig, MetricsLogger, adam, decode, log_dir_for, messages, parse_config,
                             prompt_tokens, rl_datum, service_client, stop_params)
from cookbook.text_game.env import TextGame

REPLY_PREFIX = "I choose command "
GOAL = "You play a text adventure. Find the key, take it, then open the chest. Reply with a command's number."


@dataclasses.dataclass
class Config(BaseConfig):
    steps: int = 8
    games_per_step: int = 3  # fresh maps per step
    group_size: int = 4  # episodes per map
    learning_rate: float = 5e-4  # 1e-3: one of two seeds drifted to unlisted numbers
    turn_cost: float = 0.02  # prefer short wins among the episodes of a map
    shaping: float = 0.1  # training reward per command of progress along the optimal plan (potential-based)
    max_turns: int = 8
    num_rooms: int = 4
    max_tokens: int = 1  # the reply: a command's number
    num_eval: int = 20  # held-out maps (seeds never trained on)
    eval_every: int = 8  # greedy; at temperature 1 before and after training only


@dataclasses.dataclass
class Episode:
    game: TextGame
    observation: str
    turns: list = dataclasses.field(default_factory=list)  # (prompt, tokens, logprobs, reward) per command
    reward: float = 0.0
    seen: set = dataclasses.field(default_factory=set)  # observations so far (greedy play only)
    wasted: int = 0  # turns whose reply named no listed command


def play(sampler, tokenizer, episodes: list[Episode], temperature: float, max_tokens: int, rng: random.Random,
         shaping: float = 0.0):
    """Play every episode to its end, one turn of all active episodes at a time. Greedy play (temperature 0) is
    deterministic and an observation fixes the game's state, so a greedy episode that sees an observation again is
    in a loop it never leaves: it ends there, lost, with its budget spent (this only saves time)."""
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
                to_go = e.game.plan_length()
                e.observation, reward, _ = e.game.step(decode(tokenizer, seq.tokens))
                e.reward += reward  # the game's reward; training also gets the shaping term
                e.wasted += e.observation.startswith("Nothing happens")  # not a listed number: a lost turn
                progress = to_go - e.game.plan_length()  # +1 for a command along a shortest plan, -1 away
                e.turns.append((prompts[obs], seq.tokens, seq.logprobs, reward + shaping * progress))
                e.seen.add(obs)
                if temperature == 0 and not e.game.done and e.observation in e.seen:
                    e.game.turns, e.game.done = e.game.max_turns, True
    return episodes


def advantages(group: list[Episode], turn_cost: float):
    """(prompt, tokens, logprobs, advantage) per command: its reward to go (the rewards from this command on,
    minus `turn_cost` per command) minus the mean reward to go of the map's episodes still playing at that turn.
    Commands after the key are thus credited only with what followed them (the chest), not with the key."""
    to_go = [list(accumulate(reward - turn_cost for *_, reward in reversed(e.turns)))[::-1] for e in group]
    for t in range(max(map(len, to_go))):
        here = [(e, g[t]) for e, g in zip(group, to_go) if t < len(g)]
        mean = sum(v for _, v in here) / len(here)
        yield from ((*e.turns[t][:3], v - mean) for e, v in here)


def rate(episodes: list[Episode], what: str) -> float:
    """Share of the episodes that won ("won") or hold the key ("key")."""
    return sum(e.game.won if what == "won" else e.game.key_at is None for e in episodes) / len(episodes)


def scripted_success(seeds, config: Config, choose) -> float:
    """Success rate of a player given as a function (game) -> command."""
    games = [TextGame(seed, config.num_rooms, config.max_turns) for seed in seeds]
    for game in games:
        while not game.done:
            game.step(choose(game))
    return sum(game.won for game in games) / len(games)


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

        def evaluate(sampler, at_temperature_1: bool) -> dict:
            greedy = play(sampler, tokenizer, [Episode(g, g.reset()) for g in map(new_game, held_out)], 0.0,
                          config.max_tokens, random.Random(0))
            out = {"eval_success": rate(greedy, "won"), "eval_key_taken": rate(greedy, "key"),
                   "eval_turns": sum(e.game.turns for e in greedy) / len(greedy),
                   "random_player": reference["random"], "optimal_player": reference["optimal"]}
            if at_temperature_1:  # the same maps, one episode each at temperature 1 (before and after training)
                sampled = play(sampler, tokenizer, [Episode(g, g.reset()) for g in map(new_game, held_out)], 1.0,
                               config.max_tokens, random.Random(1))
                out.update(eval_success_t1=rate(sampled, "won"), eval_key_taken_t1=rate(sampled, "key"))
            return out

        start = evaluate(sampler, True)
        logger.log(0, **start)
        for step in tqdm(range(1, config.steps + 1), desc="text_game", unit="step"):
            seeds = [rng.randrange(10**6) for _ in range(config.games_per_step)]
            groups = [[Episode(g, g.reset()) for g in map(new_game, [seed] * config.group_size)] for seed in seeds]
            play(sampler, tokenizer, [e for g in groups for e in g], 1.0, config.max_tokens, rng, config.shaping)
            merged: dict = {}  # the loss is linear in the advantage: identical (prompt, reply) pairs add up
            for prompt, tokens, logprobs, adv in (a for g in groups for a in advantages(g, config.turn_cost)):
                key = (tuple(prompt), tuple(tokens))
                merged[key] = (logprobs, merged.get(key, (None, 0.0))[1] + adv)
            data = [rl_datum(list(p), list(t), lps, adv) for (p, t), (lps, adv) in merged.items() if abs(adv) > 1e-9]
            if data:
                fwd = training.forward_backward(data, "importance_sampling")
                opt = training.optim_step(adam(config.learning_rate))
                fwd.result(), opt.result()
            sampler = training.save_weights_and_get_sampling_client().result()
            full = [e for g in groups for e in g]
            metrics = {"datums": len(data), "train_success": rate(full, "won"), "train_key_taken": rate(full, "key"),
                       "train_turns": sum(len(e.turns) for e in full) / len(full),
                       "train_valid_replies": 1 - sum(e.wasted for e in full) / sum(len(e.turns) for e in full)}
            if step % config.eval_every == 0 or step == config.steps:
                metrics.update(evaluate(sampler, step == config.steps))
            logger.log(step, **metrics)
        end = {k: v for k, v in logger.rows[-1].items() if k.startswith("eval_")}
        logger.close({"success rate (held-out maps)": ["train_success", "eval_success", "eval_success_t1",
                                                       "random_player", "optimal_player"],
                      "key taken": ["train_key_taken", "eval_key_taken", "eval_key_taken_t1"],
                      "valid replies (training)": ["train_valid_replies"],
                      "turns per episode": ["train_turns", "eval_turns"]})
        game = new_game(held_out[0])
        example = play(sampler, tokenizer, [Episode(game, game.reset())], 0.0, config.max_tokens, random.Random(0))[0]
    transcript = [decode(tokenizer, turn[1]) for turn in example.turns]
    print(f"held-out map {held_out[0]}: {transcript} -> reward {example.reward}")
    summary = {"before": start, "after": end, "reference": reference, "held_out_maps": len(held_out),
               "example_commands": transcript, "wall_time_s": logger.rows[-1]["elapsed_s"]}
    print(json.dumps(summary, indent=2))
    (log_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main(parse_config(Config))
