"""RL with a model as the grader: the policy learns to follow "Answer with one word." from the verdicts of a
grader model served by the same tinkerd; then the grader is fine-tuned on its own mistakes and RL is re-run.

    python -m cookbook.rl_grader.train [base_url=http://127.0.0.1:8000] [steps=10] [questions_per_step=12] ...

The recipe knows the truth (a reply is right when it is exactly one word) but never shows it to the grader:
the grader reads a rubric and the reply, and its verdict is P(Yes) against P(No) as its next token (read from
the top-k logprobs of a one-token sample). That probability is the policy's reward (GRPO-style: `group_size`
answers per question, centred within the group, one `importance_sampling` step per step).

Round 1 uses the base model as the grader. Then the grader is improved where it was wrong: every round-1 reply
is labelled with the truth, the grader's mistakes plus as many of its right calls are the SFT set of a grader
LoRA ("Yes"/"No" after the rubric). Round 2 trains a fresh policy against that grader; with `relabel_every` > 0
the lesson goes on: every `relabel_every` steps the replies of the latest steps are labelled the same way and
the grader adapter takes `relabel_steps` more SFT steps on its new mistakes (and as many right calls), so a
reply the policy finds that the grader misjudges is taught to it while still rare. Reported per round:
the policy's true accuracy on held-out questions (temperature 1) and the grader's agreement with the truth.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re

from tqdm import tqdm

from cookbook.common import (BaseConfig, MetricsLogger, adam, completion_tokens, decode, log_dir_for, messages,
                             parse_config, prompt_tokens, rl_datum, sample_all, service_client, sft_datum,
                             stop_params, yes_probability)

CATEGORIES = ["fruit", "colour", "animal", "country", "city", "vegetable", "metal", "flower", "tree", "bird", "fish",
              "sport", "planet", "month", "drink", "tool", "vehicle", "shape", "season", "language", "job", "insect",
              "piece of furniture", "musical instrument", "body part", "day of the week", "game", "dessert"]
OPPOSITES = ["hot", "big", "up", "fast", "day", "old", "happy", "light", "wet", "open", "early", "rich"]
QUESTIONS = [f"Name a {c}." for c in CATEGORIES] + [f"What is the opposite of {w}?" for w in OPPOSITES]
INSTRUCTION = "Answer with one word."


@dataclasses.dataclass
class Config(BaseConfig):
    steps: int = 10  # RL steps per round
    questions_per_step: int = 12
    group_size: int = 8
    learning_rate: float = 3e-4
    max_tokens: int = 12
    num_eval: int = 10  # held-out questions (never trained on), eval_samples answers each
    eval_samples: int = 8
    eval_every: int = 5
    grader_steps: int = 20  # SFT steps of the grader adapter between the rounds
    grader_batch: int = 32
    grader_learning_rate: float = 3e-4
    relabel_every: int = 0  # round 2: a grader lesson on the latest replies every this many steps (0: never)
    relabel_steps: int = 5  # SFT steps of each of those lessons


def is_one_word(reply: str) -> bool:
    """The truth the grader is not shown."""
    return re.fullmatch(r"[A-Za-z][A-Za-z'-]*[.!]?", reply.strip()) is not None


def grader_prompt(tokenizer, reply: str) -> list[int]:
    """The rubric and the reply; nothing about the truth."""
    return prompt_tokens(tokenizer, messages(f'Count the words in: "{reply}". Is it a single word? Answer Yes or No.'))


def grade(grader, tokenizer, replies: list[str]) -> list[float]:
    """The grader's P(Yes) for each reply (Yes against No)."""
    return yes_probability(grader, tokenizer, [grader_prompt(tokenizer, r) for r in replies])


def agreement(verdicts: list[float], replies: list[str]) -> float:
    return sum((v > 0.5) == is_one_word(r) for v, r in zip(verdicts, replies)) / len(replies)


def lesson(grader, tokenizer, replies: list[str], rng: random.Random, min_right: int):
    """The grader's lesson on these replies: its mistakes plus as many of its right calls, labelled with the truth."""
    unique = list(dict.fromkeys(replies))
    verdicts = grade(grader, tokenizer, unique)
    wrong = [r for v, r in zip(verdicts, unique) if (v > 0.5) != is_one_word(r)]
    right = [r for v, r in zip(verdicts, unique) if (v > 0.5) == is_one_word(r)]
    chosen = wrong + rng.sample(right, min(len(right), max(len(wrong), min_right)))
    examples = [sft_datum(grader_prompt(tokenizer, r), completion_tokens(tokenizer, "Yes" if is_one_word(r) else "No"))
                for r in chosen]
    return examples, {"replies_seen": len(unique), "mistakes": len(wrong), "examples": len(chosen),
                      "agreement_before": agreement(verdicts, unique)}, unique


def question_prompt(tokenizer, question: str) -> list[int]:
    return prompt_tokens(tokenizer, messages(f"{question} {INSTRUCTION}"))


def main(config: Config) -> dict:
    log_dir = log_dir_for(config, "rl_grader")
    rng = random.Random(config.seed)
    questions = QUESTIONS[:]
    random.Random(0).shuffle(questions)
    held_out, train_questions = questions[:config.num_eval], questions[config.num_eval:]
    logger = MetricsLogger(log_dir, config, plot_name="rl_grader.png")
    summary: dict = {"held_out_questions": len(held_out)}
    with service_client(config, log_dir) as service:
        grader = service.create_sampling_client(base_model=config.base_model).result()  # round 1: the base model
        seen: list[str] = []  # the replies not yet in a grader lesson (all of round 1, then the latest ones)
        relabels: list[dict] = []

        def teach(teacher, examples, steps):
            for _ in tqdm(range(steps), desc="grader SFT", unit="step", leave=False):
                fwd = teacher.forward_backward(rng.sample(examples, min(config.grader_batch, len(examples))),
                                               "cross_entropy")
                opt = teacher.optim_step(adam(config.grader_learning_rate))
                fwd.result(), opt.result()
            return teacher.save_weights_and_get_sampling_client().result()

        def sample_replies(policy, qs, n, temperature, seed):
            results = sample_all(policy, [question_prompt(tokenizer, q) for q in qs],
                                 stop_params(tokenizer, config.max_tokens, temperature, seed=seed), n)
            return [[decode(tokenizer, s.tokens) for s in seqs] for seqs in results], results

        def evaluate(policy, grader) -> dict:
            texts, _ = sample_replies(policy, held_out, config.eval_samples, 1.0, 1234)
            replies = [t for ts in texts for t in ts]
            return {"eval_true_acc": sum(map(is_one_word, replies)) / len(replies),
                    "eval_grader_agreement": agreement(grade(grader, tokenizer, replies), replies)}

        for rnd in (1, 2):
            training = service.create_lora_training_client(base_model=config.base_model, rank=config.rank,
                                                           seed=config.seed).result()
            tokenizer = training.get_tokenizer()
            policy = training.save_weights_and_get_sampling_client().result()  # a fresh policy each round
            offset = (rnd - 1) * (config.steps + 1)  # both rounds on one step axis
            start = evaluate(policy, grader)
            logger.log(offset, **{f"r{rnd}_{k}": v for k, v in start.items()})
            for step in tqdm(range(1, config.steps + 1), desc=f"round {rnd}", unit="step"):
                qs = [rng.choice(train_questions) for _ in range(config.questions_per_step)]
                texts, results = sample_replies(policy, qs, config.group_size, 1.0, rng.randrange(2**31))
                replies = [t for ts in texts for t in ts]
                rewards = grade(grader, tokenizer, replies)
                seen += replies
                data = []
                for i, (q, seqs) in enumerate(zip(qs, results)):
                    rs = rewards[i * config.group_size:(i + 1) * config.group_size]
                    mean = sum(rs) / len(rs)
                    data += [rl_datum(question_prompt(tokenizer, q), s.tokens, s.logprobs, r - mean)
                             for s, r in zip(seqs, rs)]
                fwd = training.forward_backward(data, "importance_sampling")
                opt = training.optim_step(adam(config.learning_rate))
                fwd.result(), opt.result()
                policy = training.save_weights_and_get_sampling_client().result()
                metrics = {"train_true_acc": sum(map(is_one_word, replies)) / len(replies),
                           "train_grader_reward": sum(rewards) / len(rewards),
                           "train_grader_agreement": agreement(rewards, replies)}
                if rnd == 2 and config.relabel_every and step % config.relabel_every == 0 and step < config.steps:
                    examples, info, _ = lesson(grader, tokenizer, seen, rng, config.grader_batch)
                    relabels.append({"after_step": step, **info, "empty_replies": sum(not r for r in set(seen))})
                    seen = []
                    if info["mistakes"]:
                        grader = teach(teacher, examples, config.relabel_steps)
                    metrics.update(relabel_mistakes=info["mistakes"], relabel_agreement=info["agreement_before"])
                if step % config.eval_every == 0 or step == config.steps:
                    metrics.update(evaluate(policy, grader))
                logger.log(offset + step, **{f"r{rnd}_{k}": v for k, v in metrics.items()})
            summary[f"round{rnd}"] = {"before": start, "after": {k[3:]: v for k, v in logger.rows[-1].items()
                                                                 if k.startswith(f"r{rnd}_eval_")}}
            if rnd == 2:
                break
            # The grader's lesson: its round-1 mistakes, and as many of its right calls, labelled with the truth.
            examples, info, unique = lesson(grader, tokenizer, seen, rng, config.grader_batch)
            seen = []
            teacher = service.create_lora_training_client(base_model=config.base_model, rank=config.rank,
                                                          seed=config.seed).result()
            grader = teach(teacher, examples, config.grader_steps)
            summary["grader_lesson"] = {**info, "agreement_after": agreement(grade(grader, tokenizer, unique), unique)}
            logger.log(offset + config.steps, **{f"grader_agreement_{k}": summary["grader_lesson"][f"agreement_{k}"]
                                                 for k in ("before", "after")})
        logger.close({"true accuracy (held out, temperature 1)": ["r1_eval_true_acc", "r2_eval_true_acc",
                                                                  "r1_train_true_acc", "r2_train_true_acc"],
                      "grader reward": ["r1_train_grader_reward", "r2_train_grader_reward"],
                      "round-2 lessons: grader mistakes found": ["r2_relabel_mistakes"],
                      "grader agreement with the truth": ["r1_eval_grader_agreement", "r2_eval_grader_agreement",
                                                          "r1_train_grader_agreement", "r2_train_grader_agreement"]})
        examples, _ = sample_replies(policy, held_out[:5], 1, 0.0, 0)
    for q, (reply,) in zip(held_out, examples):
        print(f"{q} -> {reply!r}")
    summary["round2_lessons"] = relabels
    summary["wall_time_s"] = logger.rows[-1]["elapsed_s"]
    print(json.dumps(summary, indent=2))
    (log_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main(parse_config(Config))
