"""Self-play RL on a text game (Nim): the policy plays a frozen earlier snapshot of itself and gets better
against a player it never trained against (uniformly random moves).

    python -m cookbook.selfplay.train [base_url=http://127.0.0.1:8000] [steps=24] [opponent_every=4] ...

Nim: a pile of stones, players alternately take 1, 2 or 3, whoever takes the last stone wins (an illegal
or unreadable move loses at once). Each turn the mover sees "There are 9 stones left." and its reply is
prefilled with "I take ", so a move is a single sampled token. Every step plays `games_per_step` games
against the opponent, a `save_weights_and_get_sampling_client()` snapshot of the learner refreshed every
`opponent_every` steps; the learner's moves get advantage = outcome (+1 win, -1 loss) - the batch mean, and
one `importance_sampling` step follows. Evaluation: held-out games (their own seed, never trained on)
against the random player, greedy and at temperature 1, plus the same games played by the optimal rule.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import defaultdict

from tinker import types
from tqdm import tqdm

from cookbook.common import (BaseConfig, MetricsLogger, adam, log_dir_for, messages, parse_config, prompt_tokens,
                             rl_datum, service_client)

RULES = "We play Nim. Players take turns removing 1, 2 or 3 stones from a pile. Whoever takes the last stone wins."


@dataclasses.dataclass
class Config(BaseConfig):
    steps: int = 24
    games_per_step: int = 64
    opponent_every: int = 2  # steps between opponent snapshots (tinkerd keeps the newest 8 per model)
    learning_rate: float = 2e-4
    train_min_pile: int = 1  # training games start anywhere in train_min_pile..max_pile
    min_pile: int = 5  # held-out games start in min_pile..max_pile
    max_pile: int = 15
    num_eval: int = 400  # held-out games against the random player
    eval_every: int = 4


@dataclasses.dataclass
class Game:
    pile: int
    to_move: int  # 0: the learner, 1: the other player
    moves: list = dataclasses.field(default_factory=list)  # the learner's (pile, tokens, logprobs)
    winner: int | None = None
    illegal: bool = False


def random_move(pile: int, rng: random.Random) -> int:
    return rng.randint(1, min(3, pile))


def optimal_move(pile: int, rng: random.Random) -> int:
    return pile % 4 or 1  # leave a multiple of 4 when possible


def move_prompt(tokenizer, pile: int) -> list[int]:
    return (prompt_tokens(tokenizer, messages(f"There are {pile} stones left. How many do you take?", system=RULES))
            + tokenizer.encode("I take ", add_special_tokens=False))


def play(tokenizer, players: tuple, games: list[Game], temperature: float, rng: random.Random) -> list[Game]:
    """Play all games to the end in lockstep. A player is a sampling client or a function (pile, rng) -> move.
    Games waiting on the same (player, pile) share one sample request with one sample per game."""
    while active := [g for g in games if g.winner is None]:
        waiting = defaultdict(list)
        for g in active:
            waiting[g.to_move, g.pile].append(g)
        futures = {(who, pile): players[who].sample(
            types.ModelInput.from_ints(move_prompt(tokenizer, pile)), len(gs),
            types.SamplingParams(max_tokens=1, temperature=temperature, seed=rng.randrange(2**31)))
            for (who, pile), gs in waiting.items() if not callable(players[who])}
        for (who, pile), gs in waiting.items():
            seqs = futures[who, pile].result().sequences if (who, pile) in futures else None
            for i, g in enumerate(gs):
                if seqs is None:
                    take = players[who](pile, rng)
                else:
                    text = tokenizer.decode(seqs[i].tokens).strip()
                    take = int(text) if text in ("1", "2", "3") else 0
                    if who == 0:
                        g.moves.append((pile, seqs[i].tokens, seqs[i].logprobs))
                if not 1 <= take <= pile:
                    g.winner, g.illegal = 1 - who, True
                    continue
                g.pile -= take
                if g.pile == 0:
                    g.winner = who
                g.to_move = 1 - who
    return games


def new_games(rng: random.Random, n: int, low: int, high: int) -> list[Game]:
    return [Game(rng.randint(low, high), i % 2) for i in range(n)]


def win_rate(games: list[Game]) -> float:
    return sum(g.winner == 0 for g in games) / len(games)


def main(config: Config) -> dict:
    log_dir = log_dir_for(config, "selfplay")
    rng = random.Random(config.seed)
    with service_client(config, log_dir) as service:
        training = service.create_lora_training_client(base_model=config.base_model, rank=config.rank,
                                                       seed=config.seed).result()
        tokenizer = training.get_tokenizer()
        learner = training.save_weights_and_get_sampling_client().result()  # fresh adapter == base model
        opponent = learner
        logger = MetricsLogger(log_dir, config, plot_name="selfplay.png")

        def evaluate(player, temperatures=(0.0, 1.0)) -> dict:
            out = {}
            for t in temperatures:  # the same held-out games (and random player's seed) every time
                games = new_games(random.Random(10**6 + config.seed), config.num_eval, config.min_pile, config.max_pile)
                play(tokenizer, (player, random_move), games, t, random.Random(7))
                out[f"eval_win_vs_random_t{t:g}"] = win_rate(games)
                out[f"eval_illegal_t{t:g}"] = sum(g.illegal and g.winner == 1 for g in games) / len(games)
            return out

        def greedy_policy(player) -> dict:
            futures = {pile: player.sample(types.ModelInput.from_ints(move_prompt(tokenizer, pile)), 1,
                                           types.SamplingParams(max_tokens=1, temperature=0.0))
                       for pile in range(1, config.max_pile + 1)}
            return {pile: tokenizer.decode(f.result().sequences[0].tokens).strip() for pile, f in futures.items()}

        reference = {"optimal": evaluate(optimal_move, (0.0,))["eval_win_vs_random_t0"],
                     "random": evaluate(random_move, (0.0,))["eval_win_vs_random_t0"]}
        policy_before = greedy_policy(learner)
        start = evaluate(learner)
        logger.log(0, **start)
        for step in tqdm(range(1, config.steps + 1), desc="selfplay", unit="step"):
            games = new_games(rng, config.games_per_step, config.train_min_pile, config.max_pile)
            play(tokenizer, (learner, opponent), games, 1.0, rng)
            outcomes = [1.0 if g.winner == 0 else -1.0 for g in games]
            by_pile = defaultdict(list)  # baseline per position: the mean outcome of the learner's moves from it
            for g, z in zip(games, outcomes):
                for pile, _, _ in g.moves:
                    by_pile[pile].append(z)
            baseline = {pile: sum(zs) / len(zs) for pile, zs in by_pile.items()}
            # The loss is linear in the advantage: identical (pile, move) pairs merge into one datum (summed advantage).
            merged: dict = {}
            for g, z in zip(games, outcomes):
                for pile, tokens, logprobs in g.moves:
                    key = (pile, tuple(tokens))
                    merged[key] = (logprobs, merged.get(key, (None, 0.0))[1] + z - baseline[pile])
            data = [rl_datum(move_prompt(tokenizer, pile), list(tokens), lps, adv)
                    for (pile, tokens), (lps, adv) in merged.items() if adv != 0.0]
            if data:
                fwd = training.forward_backward(data, "importance_sampling")
                opt = training.optim_step(adam(config.learning_rate * (1 - (step - 1) / config.steps)))  # linear decay
                fwd.result(), opt.result()
            learner = training.save_weights_and_get_sampling_client().result()
            metrics = {"train_win_vs_snapshot": win_rate(games),
                       "train_illegal": sum(g.illegal and g.winner == 1 for g in games) / len(games),
                       "moves_per_game": sum(len(g.moves) for g in games) / len(games)}
            if step % config.opponent_every == 0:
                opponent = learner  # the new frozen snapshot
            if step % config.eval_every == 0 or step == config.steps:
                metrics.update(evaluate(learner))
            logger.log(step, **metrics)
        end = {k: v for k, v in logger.rows[-1].items() if k.startswith("eval_")}
        logger.close({"held-out win rate vs random": ["eval_win_vs_random_t0", "eval_win_vs_random_t1"],
                      "win rate vs frozen snapshot": ["train_win_vs_snapshot"],
                      "illegal moves (losses)": ["train_illegal", "eval_illegal_t0", "eval_illegal_t1"]})
        policy_after = greedy_policy(learner)
    print("greedy move by pile size (before -> after; optimal = pile % 4):")
    for pile in range(1, config.max_pile + 1):
        print(f"  {pile:2d}: {policy_before[pile]!r} -> {policy_after[pile]!r}  (optimal {pile % 4 or '-'})")
    summary = {"before": start, "after": end, "reference_vs_random": reference, "held_out_games": config.num_eval,
               "greedy_move_before": policy_before, "greedy_move_after": policy_after,
               "wall_time_s": logger.rows[-1]["elapsed_s"]}
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("greedy")}, indent=2))
    (log_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main(parse_config(Config))
