"""RL on a multi-turn text adventure: the policy learns to find the key and open the chest within a turn budget.

    python -m cookbook.text_game.train [base_url=http://127.0.0.1:8000] [steps=16] [seed=0] [learning_rate=2e-4] ...

The game is `env.TextGame` (deterministic under a seed); its observation lists the commands that do something,
numbered, and each door says what the player knows lies that way, so the observation alone suffices to play well.
Each turn the policy sees the observation under a system prompt stating the goal; its reply is one token, a number,
after the prefill "I need the key, so I choose command " ("the chest" once carrying the key). Every step plays
`group_size` episodes on each of `games_per_step` fresh maps in lockstep (episodes that see the same observation
share one `sample` request). A command's reward is the game's (0.5 for the key, 1 for the chest) plus `shaping` per
command of progress along the optimal plan (minus per step away), minus `turn_cost`, minus `invalid_penalty` for a
reply that is no listed number; its advantage is its discounted return minus the mean return from the same
observation; every (observation, reply) pair is trained on, in one `importance_sampling` step per step. Held-out
games are played greedily and at temperature 1 before and after training, next to a random player and the scripted
optimal player (the plot's two ends) and a scripted player that reads only the observation."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import defaultdict

from tinker import types
from tqdm import tqdm

from cookbook.common import (BaseConfig, MetricsLogger, adam, decode, log_dir_for, messages, parse_config,
                             prompt_tokens, rl_datum, service_client, stop_params)
from cookbook.text_game.env import TextGame, reactive_action

GOAL = "You play a text adventure. Find the key, take it, then open the chest. Reply with a command's number."


def reply_prefix(observation: str) -> str:
    """The reply's first words, written for the policy from the observation: what it needs next."""
    return f"I need the {'chest' if 'You carry the key.' in observation else 'key'}, so I choose command "


@dataclasses.dataclass
class Config(BaseConfig):
    steps: int = 16
    games_per_step: int = 3  # fresh maps per step
    group_size: int = 8  # episodes per map
    learning_rate: float = 2e-4  # 5e-4 collapsed to one reply per observation in 5 steps; 1e-4 learned little in 16
    turn_cost: float = 0.02  # prefer short wins
    shaping: float = 0.2  # training reward per command of progress along the optimal plan, minus per step away
    invalid_penalty: float = 0.1  # training reward for a reply that names no listed command: minus this
    discount: float = 0.7  # a command's return: its reward + discount * the next command's return
    max_turns: int = 8
    num_rooms: int = 4
    max_tokens: int = 1  # the reply: a command's number
    num_eval: int = 20  # held-out maps (seeds never trained on)
    eval_every: int = 8  # greedy; at temperature 1 before and after training only
    eval_samples: int = 4  # episodes per held-out map at temperature 1


@dataclasses.dataclass
class Episode:
    game: TextGame
    observation: str
    turns: list = dataclasses.field(default_factory=list)  # (prompt, tokens, logprobs, reward) per command
    reward: float = 0.0
    seen: set = dataclasses.field(default_factory=set)  # observations so far (greedy play only)
    wasted: int = 0  # turns whose reply named no listed command


def play(sampler, tokenizer, episodes: list[Episode], temperature: float, max_tokens: int, rng: random.Random,
         shaping: float = 0.0, invalid_penalty: float = 0.0):
    """Play every episode to its end, one turn of all active episodes at a time. Greedy play (temperature 0) is
    deterministic and an observation fixes the game's state, so a greedy episode that sees an observation again is
    in a loop it never leaves: it ends there, lost, with its budget spent (this only saves time)."""
    while active := [e for e in episodes if not e.game.done]:
        waiting = defaultdict(list)
        for e in active:
            waiting[e.observation].append(e)
        params = stop_params(tokenizer, max_tokens, temperature, seed=rng.randrange(2**31))
        prompts = {obs: prompt_tokens(tokenizer, messages(obs, system=GOAL))
                   + tokenizer.encode(reply_prefix(obs), add_special_tokens=False) for obs in waiting}
        futures = {obs: sampler.sample(types.ModelInput.from_ints(prompts[obs]), len(es), params)
                   for obs, es in waiting.items()}
        for obs, es in waiting.items():
            for e, seq in zip(es, futures[obs].result().sequences):
                to_go = e.game.plan_length()
                e.observation, reward, _ = e.game.step(decode(tokenizer, seq.tokens))
                e.reward += reward  # the game's reward; training also gets the shaping term
                e.wasted += (wasted := e.observation.startswith("Nothing happens"))  # not a listed number: lost
                progress = to_go - e.game.plan_length()  # +1 for a command along a shortest plan, -1 away
                e.turns.append((prompts[obs], seq.tokens, seq.logprobs,
                                reward + shaping * progress - invalid_penalty * wasted))
                e.seen.add(obs)
                if temperature == 0 and not e.game.done and e.observation in e.seen:
                    e.game.turns, e.game.done = e.game.max_turns, True
    return episodes


def advantages(episodes: list[Episode], turn_cost: float, discount: float):
    """(prompt, tokens, logprobs, advantage) per command: its discounted return (its reward minus `turn_cost`, plus
    `discount` times the next command's return) minus the mean return of every command played from the same
    observation (the same prompt) in `episodes`. The observation fixes the game's state, so this is a baseline per
    state; a command whose observation no other episode met gets advantage 0."""
    played = []
    for e in episodes:
        ret, returns = 0.0, []
        for prompt, tokens, logprobs, reward in reversed(e.turns):
            ret = reward - turn_cost + discount * ret
            returns.append((prompt, tokens, logprobs, ret))
        played += returns[::-1]
    state = defaultdict(list)
    for prompt, *_, ret in played:
        state[tuple(prompt)].append(ret)
    baseline = {prompt: sum(returns) / len(returns) for prompt, returns in state.items()}
    for prompt, tokens, logprobs, ret in played:
        yield prompt, tokens, logprobs, ret - baseline[tuple(prompt)]


def rate(episodes: list[Episode], what: str) -> float:
    """Share of the episodes that won ("won") or hold the key ("key")."""
    return sum(e.game.won if what == "won" else e.game.key_at is None for e in episodes) / len(episodes)


def scripted_success(seeds, config: Config, choose) -> float:
    """Success rate of a player given as a function (game, observation) -> command."""
    games = [TextGame(seed, config.num_rooms, config.max_turns) for seed in seeds]
    for game in games:
        observation = game.reset()
        while not game.done:
            observation = game.step(choose(game, observation))[0]
    return sum(game.won for game in games) / len(games)


def main(config: Config) -> dict:
    log_dir = log_dir_for(config, "text_game")
    rng = random.Random(config.seed)
    held_out = [10**6 + i for i in range(config.num_eval)]  # training maps use seeds below 10**6
    new_game = lambda seed: TextGame(seed, config.num_rooms, config.max_turns)  # noqa: E731
    random_player = random.Random(7)
    reference = {"random": scripted_success(held_out, config, lambda g, _: g.random_action(random_player)),
                 "reactive": scripted_success(held_out, config, lambda _, obs: reactive_action(obs)),
                 "optimal": scripted_success(held_out, config, lambda g, _: g.optimal_action())}
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
                   **{f"{name}_player": value for name, value in reference.items()}}
            if at_temperature_1:  # the same maps, `eval_samples` episodes each at temperature 1 (before and after)
                sampled = play(sampler, tokenizer, [Episode(g, g.reset()) for g in map(new_game, held_out
                               * config.eval_samples)], 1.0, config.max_tokens, random.Random(1))  # a game each
                out.update(eval_success_t1=rate(sampled, "won"), eval_key_taken_t1=rate(sampled, "key"))
            return out

        start = evaluate(sampler, True)
        logger.log(0, **start)
        for step in tqdm(range(1, config.steps + 1), desc="text_game", unit="step"):
            seeds = [rng.randrange(10**6) for _ in range(config.games_per_step)]
            groups = [[Episode(g, g.reset()) for g in map(new_game, [seed] * config.group_size)] for seed in seeds]
            full = [e for g in groups for e in g]
            play(sampler, tokenizer, full, 1.0, config.max_tokens, rng, config.shaping, config.invalid_penalty)
            merged: dict = {}  # the loss is linear in the advantage: identical (prompt, reply) pairs add up
            for prompt, tokens, logprobs, adv in advantages(full, config.turn_cost, config.discount):
                key = (tuple(prompt), tuple(tokens))
                merged[key] = (logprobs, merged.get(key, (None, 0.0))[1] + adv)
            data = [rl_datum(list(p), list(t), lps, adv) for (p, t), (lps, adv) in merged.items() if abs(adv) > 1e-9]
            if data:
                fwd = training.forward_backward(data, "importance_sampling")
                opt = training.optim_step(adam(config.learning_rate))
                fwd.result(), opt.result()
            sampler = training.save_weights_and_get_sampling_client().result()
            metrics = {"datums": len(data), "train_success": rate(full, "won"), "train_key_taken": rate(full, "key"),
                       "train_turns": sum(len(e.turns) for e in full) / len(full),
                       "train_valid_replies": 1 - sum(e.wasted for e in full) / sum(len(e.turns) for e in full)}
            if step % config.eval_every == 0 or step == config.steps:
                metrics.update(evaluate(sampler, step == config.steps))
            logger.log(step, **metrics)
        end = {k: v for k, v in logger.rows[-1].items() if k.startswith("eval_")}
        logger.close({"success rate (held-out maps)": ["train_success", "eval_success", "eval_success_t1",
                                                       "random_player", "reactive_player", "optimal_player"],
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
