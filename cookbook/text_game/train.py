"""RL on a multi-turn text adventure: the policy learns to find the key and open the chest within a turn budget.

    python -m cookbook.text_game.train [base_url=http://127.0.0.1:8000] [steps=10] [games_per_step=5] ...

The game is `env.TextGame` (deterministic under a seed); its observations list the commands that do something,
numbered, and the policy replies with a number (one token after the prefilled "I choose command "; a reply that
is not a listed number wastes the turn). An episode is ONE conversation: each turn appends the reply and the
next observation to the previous prompt, so the policy sees its history, and the whole episode is one datum
whose advantages sit on the reply tokens only. Every step plays `group_size` episodes on each of
`games_per_step` fresh maps in lockstep. Each command is scored by its reward to go (0.5 for the key, 1 for the
chest, `shaping` per command of progress along the optimal plan, minus `turn_cost` per command), centred over the
map's episodes at the same turn: one `importance_sampling` step per step over all episodes. Held-out games are
played greedily and at temperature 1 before and after training, next to a random player and the scripted
optimal player: the plot's two ends.
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
                             prompt_tokens, service_client)
from cookbook.text_game.env import TextGame

PREFILL = "I choose command "
GOAL = "You play a text adventure. Find the key, take it, then open the chest. Reply with a command's number."


@dataclasses.dataclass
class Config(BaseConfig):
    steps: int = 8
    games_per_step: int = 3  # fresh maps per step
    group_size: int = 4  # episodes per map
    learning_rate: float = 1e-3
    turn_cost: float = 0.02  # prefer short wins among the episodes of a map
    shaping: float = 0.1  # training reward per command of progress along the optimal plan (potential-based)
    max_turns: int = 8
    num_rooms: int = 4
    num_eval: int = 20  # held-out maps (seeds never trained on)
    eval_every: int = 8  # greedy; at temperature 1 before and after training only


@dataclasses.dataclass
class Episode:
    game: TextGame
    tokens: list  # the conversation so far: prompt, replies and observations, ending where the model speaks next
    turns: list = dataclasses.field(default_factory=list)  # (position in tokens, reply tokens, logprobs, reward)
    reward: float = 0.0
    wasted: int = 0  # turns whose reply named no listed command


def first_prompt(tokenizer, observation: str) -> list[int]:
    return prompt_tokens(tokenizer, messages(observation, system=GOAL)) + tokenizer.encode(PREFILL, add_special_tokens=False)


def next_turn(tokenizer, observation: str) -> list[int]:
    """The tokens that close a reply and open the next turn (end of turn, the user's observation, the assistant
    header, the prefill), cut from the chat template so that prompt + reply + these extend the conversation."""
    chat = messages("x", system=GOAL) + [{"role": "assistant", "content": "@@"}]
    before = tokenizer.apply_chat_template(chat, tokenize=False)
    after = tokenizer.apply_chat_template(chat + [{"role": "user", "content": observation}], tokenize=False,
                                          add_generation_prompt=True)
    return tokenizer.encode(after[before.index("@@") + 2:] + PREFILL, add_special_tokens=False)


def play(sampler, tokenizer, episodes: list[Episode], temperature: float, rng: random.Random, shaping: float = 0.0):
    """Play every episode to its end, one turn of all active episodes at a time (episodes with the same
    conversation so far share one `sample` request)."""
    while active := [e for e in episodes if not e.game.done]:
        waiting = defaultdict(list)
        for e in active:
            waiting[tuple(e.tokens)].append(e)
        params = types.SamplingParams(max_tokens=1, temperature=temperature, seed=rng.randrange(2**31))
        futures = {key: sampler.sample(types.ModelInput.from_ints(list(key)), len(es), params)
                   for key, es in waiting.items()}
        for key, es in waiting.items():
            for e, seq in zip(es, futures[key].result().sequences):
                to_go = e.game.plan_length()
                observation, reward, done = e.game.step(decode(tokenizer, seq.tokens))
                e.reward += reward  # the game's reward; training also gets the shaping term
                e.wasted += observation.startswith("Nothing happens")  # not a listed number: a lost turn
                progress = to_go - e.game.plan_length()  # +1 for a command along a shortest plan, -1 away
                e.turns.append((len(e.tokens), list(seq.tokens), list(seq.logprobs), reward + shaping * progress))
                e.tokens = e.tokens + list(seq.tokens) + ([] if done else next_turn(tokenizer, observation))
    return episodes


def advantages(group: list[Episode], turn_cost: float) -> list[list[float]]:
    """Per episode, per command: its reward to go (the rewards from this command on, minus `turn_cost` per
    command) minus the mean reward to go of the map's episodes still playing at that turn. Commands after the
    key are thus credited only with what followed them (the chest), not with the key."""
    to_go = [list(accumulate(reward - turn_cost for *_, reward in reversed(e.turns)))[::-1] for e in group]
    out = [[0.0] * len(g) for g in to_go]
    for t in range(max(map(len, to_go))):
        here = [i for i, g in enumerate(to_go) if t < len(g)]
        mean = sum(to_go[i][t] for i in here) / len(here)
        for i in here:
            out[i][t] = to_go[i][t] - mean
    return out


def episode_datum(e: Episode, advs: list[float]) -> types.Datum:
    """The whole episode as one `importance_sampling` datum: next-token targets over the conversation, the
    sampler's logprobs and the command's advantage on each reply token, zero on every other token."""
    logprobs, adv = [0.0] * len(e.tokens), [0.0] * len(e.tokens)
    for (at, tokens, lps, _), a in zip(e.turns, advs):
        logprobs[at:at + len(tokens)], adv[at:at + len(tokens)] = lps, [a] * len(tokens)
    return types.Datum(model_input=types.ModelInput.from_ints(e.tokens[:-1]),
                       loss_fn_inputs={"target_tokens": e.tokens[1:], "logprobs": logprobs[1:], "advantages": adv[1:]})


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
        fresh = lambda games: [Episode(g, first_prompt(tokenizer, g.reset())) for g in games]  # noqa: E731

        def evaluate(sampler, at_temperature_1: bool) -> dict:
            greedy = play(sampler, tokenizer, fresh(map(new_game, held_out)), 0.0, random.Random(0))
            out = {"eval_success": rate(greedy, "won"), "eval_key_taken": rate(greedy, "key"),
                   "eval_turns": sum(e.game.turns for e in greedy) / len(greedy),
                   "random_player": reference["random"], "optimal_player": reference["optimal"]}
            if at_temperature_1:  # the same maps, one episode each at temperature 1 (before and after training)
                sampled = play(sampler, tokenizer, fresh(map(new_game, held_out)), 1.0, random.Random(1))
                out.update(eval_success_t1=rate(sampled, "won"), eval_key_taken_t1=rate(sampled, "key"))
            return out

        start = evaluate(sampler, True)
        logger.log(0, **start)
        for step in tqdm(range(1, config.steps + 1), desc="text_game", unit="step"):
            seeds = [rng.randrange(10**6) for _ in range(config.games_per_step)]
            groups = [fresh(map(new_game, [seed] * config.group_size)) for seed in seeds]
            play(sampler, tokenizer, [e for g in groups for e in g], 1.0, rng, config.shaping)
            data = [episode_datum(e, a) for g in groups for e, a in zip(g, advantages(g, config.turn_cost))
                    if any(abs(x) > 1e-9 for x in a)]  # an episode with no advantage anywhere adds nothing
            if data:
                fwd = training.forward_backward(data, "importance_sampling")
                opt = training.optim_step(adam(config.learning_rate))
                fwd.result(), opt.result()
            sampler = training.save_weights_and_get_sampling_client().result()
            episodes = [e for g in groups for e in g]
            metrics = {"datums": len(data), "train_success": rate(episodes, "won"),
                       "train_key_taken": rate(episodes, "key"),
                       "train_turns": sum(len(e.turns) for e in episodes) / len(episodes),
                       "train_valid_replies": 1 - sum(e.wasted for e in episodes) / sum(len(e.turns) for e in episodes)}
            if step % config.eval_every == 0 or step == config.steps:
                metrics.update(evaluate(sampler, step == config.steps))
            logger.log(step, **metrics)
        end = {k: v for k, v in logger.rows[-1].items() if k.startswith("eval_")}
        logger.close({"success rate (held-out maps)": ["train_success", "eval_success", "eval_success_t1",
                                                       "random_player", "optimal_player"],
                      "key taken": ["train_key_taken", "eval_key_taken", "eval_key_taken_t1"],
                      "turns per episode": ["train_turns", "eval_turns"]})
        (example,) = play(sampler, tokenizer, fresh([new_game(held_out[0])]), 0.0, random.Random(0))
    transcript = [decode(tokenizer, turn[1]) for turn in example.turns]
    print(f"held-out map {held_out[0]}: {transcript} -> reward {example.reward}")
    summary = {"before": start, "after": end, "reference": reference, "held_out_maps": len(held_out),
               "example_replies": transcript, "wall_time_s": logger.rows[-1]["elapsed_s"]}
    print(json.dumps(summary, indent=2))
    (log_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main(parse_config(Config))
