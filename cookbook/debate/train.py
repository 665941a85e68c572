"""Debate: two copies of the policy argue opposite answers before a judge model; both are trained on the
judge's verdicts (zero-sum), and the judge gets more often right.

    python -m cookbook.debate.train [base_url=http://127.0.0.1:8000] [steps=12] [stories_per_step=16] ...

A story of six numbered sentences ("3. Tom's kite is red.") and a question with a checkable answer
("What colour is Tom's kite?"). The honest debater argues the true colour, the liar a colour the story also
mentions (Tom's bike, Anna's cat). Both see the story; the judge (the frozen base model) does not.
Each debater's move is one sentence it reveals to the judge (a one-token reply: its number), so evidence
cannot be forged, only chosen: the judge sees the question and the two revealed sentences, and its verdict
is its probability of the true colour against the false one as the next token after "Tom's kite is" (read
from the top-k logprobs of a one-token sample, both orders of the evidence averaged). Rewards are zero-sum:
honest 2v - 1, liar 1 - 2v.
One LoRA policy plays both sides (the prompt says which answer to defend); every step samples `group_size`
reveals per side per story, centres each side's rewards within its group and takes one
`importance_sampling` step. Reported: judge accuracy (verdict v > 0.5) on held-out stories, greedy moves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random

from tqdm import tqdm

from cookbook.common import (BaseConfig, MetricsLogger, adam, log_dir_for, messages, parse_config, prompt_tokens,
                             next_token_logprobs, rl_datum, sample_all, service_client, stop_params)

NAMES = ["Tom", "Anna", "Leo", "Mia", "Sam", "Eva", "Ben", "Zoe"]
THINGS = ["car", "hat", "bike", "cat", "kite", "door"]
COLOURS = ["red", "blue", "green", "black", "white", "yellow", "pink", "brown"]
SYSTEM = "You are a debater. Show the judge the one sentence of the story that best supports your answer."


@dataclasses.dataclass
class Config(BaseConfig):
    steps: int = 12
    stories_per_step: int = 16
    group_size: int = 4  # reveals sampled per side per story (debate i pairs honest i with liar i)
    learning_rate: float = 1e-3
    num_eval: int = 100  # held-out stories
    eval_every: int = 4


@dataclasses.dataclass
class Story:
    sentences: list[str]
    name: str
    thing: str
    truth: str
    lie: str
    key: int  # index of the sentence that answers the question
    decoys: tuple[int, int]  # the sentences that mention the liar's colour

    @property
    def question(self) -> str:
        return f"What colour is {self.name}'s {self.thing}?"


def make_story(rng: random.Random) -> Story:
    name, other = rng.sample(NAMES, 2)
    thing, other_thing, third_thing = rng.sample(THINGS, 3)
    truth, lie, *rest = rng.sample(COLOURS, 5)
    facts = [(name, thing, truth), (name, other_thing, lie), (other, third_thing, lie)]
    while len(facts) < 6:  # three more sentences about other people's things, in neither debater's colour
        n, t = rng.choice(NAMES), rng.choice(THINGS)
        if all((n, t) != f[:2] for f in facts):
            facts.append((n, t, rng.choice(rest)))
    order = list(range(6))
    rng.shuffle(order)
    sentences = [f"{facts[i][0]}'s {facts[i][1]} is {facts[i][2]}." for i in order]
    return Story(sentences, name, thing, truth, lie, order.index(0), (order.index(1), order.index(2)))


def debater_prompt(tokenizer, story: Story, answer: str) -> list[int]:
    text = ("Story:\n" + "\n".join(f"{i + 1}. {s}" for i, s in enumerate(story.sentences)) +
            f"\nQuestion: {story.question}\nYour answer: {answer}. Which sentence supports your answer?")
    prefill = tokenizer.encode("Sentence ", add_special_tokens=False)
    return prompt_tokens(tokenizer, messages(text, system=SYSTEM)) + prefill


def revealed(tokenizer, story: Story, tokens: list[int]) -> int | None:
    """The sentence index a one-token move names, or None for anything but a valid number."""
    text = tokenizer.decode(tokens).strip()
    return int(text) - 1 if text.isdigit() and 1 <= int(text) <= len(story.sentences) else None


def judge_requests(tokenizer, story: Story, moves: tuple) -> list:
    """Two (prompt, [true colour token, false colour token]) requests: the revealed sentences in both orders."""
    answer = tokenizer.encode(f"{story.name}'s {story.thing} is", add_special_tokens=False)
    options = [tokenizer.encode(" " + c, add_special_tokens=False)[0] for c in (story.truth, story.lie)]
    requests = []
    for order in (moves, moves[::-1]):
        facts = "".join(f"Fact: {story.sentences[m]}\n" for m in order if m is not None)
        requests.append((prompt_tokens(tokenizer, messages(f"{facts}Question: {story.question}")) + answer, options))
    return requests


def verdicts(judge, tokenizer, debates: list) -> list[float]:
    """The judge's probability of the true answer for each (story, honest move, liar move), memoised."""
    unique = list(dict.fromkeys((id(s), h, l) for s, h, l in debates))
    stories = {id(s): s for s, _, _ in debates}
    scores = next_token_logprobs(judge, [r for k in unique for r in judge_requests(tokenizer, stories[k[0]], k[1:])])
    v = {k: sum(1 / (1 + math.exp(f - t)) for t, f in scores[2 * i:2 * i + 2]) / 2 for i, k in enumerate(unique)}
    return [v[id(s), h, l] for s, h, l in debates]


def zero_sum_rewards(v: float) -> tuple[float, float]:
    return 2 * v - 1, 1 - 2 * v


def main(config: Config) -> dict:
    log_dir = log_dir_for(config, "debate")
    rng = random.Random(config.seed)
    held_out = [make_story(random.Random(10**6 + i)) for i in range(config.num_eval)]
    with service_client(config, log_dir) as service:
        training = service.create_lora_training_client(base_model=config.base_model, rank=config.rank,
                                                       seed=config.seed).result()
        tokenizer = training.get_tokenizer()
        judge = service.create_sampling_client(base_model=config.base_model).result()  # frozen base model
        policy = training.save_weights_and_get_sampling_client().result()  # fresh adapter == base model
        logger = MetricsLogger(log_dir, config, plot_name="debate.png")

        def play(stories, temperature, n, seed):
            params = stop_params(tokenizer, 1, temperature, seed=seed)
            prompts = [debater_prompt(tokenizer, s, a) for s in stories for a in (s.truth, s.lie)]
            seqs = sample_all(policy, prompts, params, num_samples=n)
            return prompts, seqs[0::2], seqs[1::2]

        def evaluate() -> dict:
            _, honest, liar = play(held_out, 0.0, 1, 0)
            moves = [(s, revealed(tokenizer, s, h[0].tokens), revealed(tokenizer, s, l[0].tokens))
                     for s, h, l in zip(held_out, honest, liar)]
            v = verdicts(judge, tokenizer, moves)
            n = len(held_out)
            return {"eval_judge_acc": sum(x > 0.5 for x in v) / n, "eval_verdict_true": sum(v) / n,
                    "eval_honest_shows_key": sum(h == s.key for s, h, _ in moves) / n,
                    "eval_liar_shows_decoy": sum(l in s.decoys for s, _, l in moves) / n}

        # The two ends: both debaters reveal at random, and the honest one shows the answer while the liar
        # shows its strongest decoy (the one with the lower verdict for each held-out story).
        ref_rng = random.Random(1)
        random_v = verdicts(judge, tokenizer, [(s, ref_rng.randrange(6), ref_rng.randrange(6)) for s in held_out])
        best_v = verdicts(judge, tokenizer, [(s, s.key, d) for s in held_out for d in s.decoys])
        reference = {"judge_acc_random_moves": sum(x > 0.5 for x in random_v) / len(held_out),
                     "judge_acc_key_vs_best_decoy": sum(min(best_v[2 * i:2 * i + 2]) > 0.5
                                                        for i in range(len(held_out))) / len(held_out)}
        start = evaluate()
        logger.log(0, **start)
        for step in tqdm(range(1, config.steps + 1), desc="debate", unit="step"):
            stories = [make_story(rng) for _ in range(config.stories_per_step)]
            prompts, honest, liar = play(stories, 1.0, config.group_size, rng.randrange(2**31))
            debates = [(s, revealed(tokenizer, s, h.tokens), revealed(tokenizer, s, l.tokens))
                       for s, hs, ls in zip(stories, honest, liar) for h, l in zip(hs, ls)]
            v = verdicts(judge, tokenizer, debates)
            merged: dict = {}  # the loss is linear in the advantage: the same move in the same prompt adds up
            for i, (hs, ls) in enumerate(zip(honest, liar)):
                rewards = [zero_sum_rewards(x) for x in v[i * config.group_size:(i + 1) * config.group_size]]
                for side, seqs in ((0, hs), (1, ls)):
                    rs = [r[side] for r in rewards]
                    for s, r in zip(seqs, rs):
                        key = (2 * i + side, tuple(s.tokens))
                        merged[key] = (s.logprobs, merged.get(key, (None, 0.0))[1] + r - sum(rs) / len(rs))
            data = [rl_datum(prompts[i], list(t), lps, adv) for (i, t), (lps, adv) in merged.items() if abs(adv) > 1e-6]
            if data:
                fwd = training.forward_backward(data, "importance_sampling")
                opt = training.optim_step(adam(config.learning_rate))
                fwd.result(), opt.result()
            policy = training.save_weights_and_get_sampling_client().result()
            metrics = {"train_judge_acc": sum(x > 0.5 for x in v) / len(v), "train_verdict_true": sum(v) / len(v),
                       "train_honest_shows_key": sum(h == s.key for s, h, _ in debates) / len(debates),
                       "train_liar_shows_decoy": sum(l in s.decoys for s, _, l in debates) / len(debates)}
            if step % config.eval_every == 0 or step == config.steps:
                metrics.update(evaluate())
            logger.log(step, **metrics)
        end = {k: v for k, v in logger.rows[-1].items() if k.startswith("eval_")}
        logger.close({"judge accuracy": ["train_judge_acc", "eval_judge_acc"],
                      "judge's P(true answer)": ["train_verdict_true", "eval_verdict_true"],
                      "moves": ["eval_honest_shows_key", "eval_liar_shows_decoy"]})
    summary = {"before": start, "after": end, "reference": reference, "held_out_stories": len(held_out),
               "wall_time_s": logger.rows[-1]["elapsed_s"]}
    print(json.dumps(summary, indent=2))
    (log_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main(parse_config(Config))
