"""On-policy distillation (context distillation): the student learns, without any system prompt, to
answer like the base model does under a strong system prompt (the teacher: a pirate).

    python -m cookbook.distill.train [base_url=http://127.0.0.1:8000] [steps=30] ...

Every step the student samples answers to plain questions; the teacher (the base model, prompted with
TEACHER_SYSTEM) scores every sampled token with `compute_logprobs`; each token's advantage is
teacher_logprob - student_logprob, the negative of the per-token reverse KL estimate, and one
`importance_sampling` step pushes the student toward the teacher on its own samples. Metric: the
per-token reverse KL(student || teacher) on held-out questions, estimated from student samples.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

from tinker import types
from tqdm import tqdm

from cookbook.common import (BaseConfig, MetricsLogger, decode, log_dir_for, messages, parse_config, prompt_tokens,
                             sample_all, service_client, stop_params)

QUESTIONS = Path(__file__).parent / "data" / "questions.txt"
TEACHER_SYSTEM = "You are a pirate. Always talk like a pirate: start every answer with 'Arr!' and call the user 'matey'."
PIRATE_WORDS = re.compile(r"\b(arr+|matey|aye|ahoy)\b", re.IGNORECASE)


@dataclasses.dataclass
class Config(BaseConfig):
    steps: int = 30
    questions_per_step: int = 8
    samples_per_question: int = 4
    max_tokens: int = 48
    learning_rate: float = 5e-4
    num_test: int = 16  # held-out questions (the last lines of the file)
    eval_samples: int = 4  # student samples per held-out question
    eval_every: int = 5


def rollouts(student, teacher, tokenizer, questions: list[str], n: int, max_tokens: int, seed: int):
    """Student samples (plain chat, temperature 1) and, per sample, the teacher's logprob of each sampled
    token, seen after the teacher's own system-prompted chat. Returns (student prompt, sample, teacher lps)."""
    prompts = [prompt_tokens(tokenizer, messages(q)) for q in questions]
    groups = sample_all(student, prompts, stop_params(tokenizer, max_tokens, temperature=1.0, seed=seed), n)
    jobs = []
    for q, prompt, seqs in zip(questions, prompts, groups):
        teacher_prompt = prompt_tokens(tokenizer, messages(q, system=TEACHER_SYSTEM))
        for s in seqs:  # all scoring requests go out before we wait on any
            future = teacher.compute_logprobs(types.ModelInput.from_ints(teacher_prompt + list(s.tokens)))
            jobs.append((prompt, s, future, len(teacher_prompt)))
    return [(prompt, s, future.result()[start:]) for prompt, s, future, start in jobs]


def reverse_kl(samples) -> float:
    """Per-token estimate of KL(student || teacher): mean over sampled tokens of student_lp - teacher_lp."""
    diffs = [s_lp - t_lp for _, s, t in samples for s_lp, t_lp in zip(s.logprobs, t)]
    return sum(diffs) / len(diffs)


def pirate_rate(tokenizer, samples) -> float:
    return sum(bool(PIRATE_WORDS.search(decode(tokenizer, s.tokens))) for _, s, _ in samples) / len(samples)


def distill_datum(prompt: list[int], seq, teacher_lps: list[float]) -> types.Datum:
    n = len(prompt) - 1
    advantages = [t - s for s, t in zip(seq.logprobs, teacher_lps)]  # -(per-token reverse KL)
    return types.Datum(model_input=types.ModelInput.from_ints(prompt + list(seq.tokens[:-1])),
                       loss_fn_inputs={"target_tokens": prompt[1:] + list(seq.tokens),
                                       "logprobs": [0.0] * n + list(seq.logprobs),
                                       "advantages": [0.0] * n + advantages})


def main(config: Config) -> dict:
    log_dir = log_dir_for(config, "distill")
    questions = [q.strip() for q in open(QUESTIONS) if q.strip()]
    train_q, test_q = questions[:-config.num_test], questions[-config.num_test:]
    rng = random.Random(config.seed)
    with service_client(config, log_dir) as service:
        training = service.create_lora_training_client(base_model=config.base_model, rank=config.rank,
                                                       seed=config.seed).result()
        tokenizer = training.get_tokenizer()
        teacher = service.create_sampling_client(base_model=config.base_model).result()
        logger = MetricsLogger(log_dir, config, plot_name="distill.png")

        def evaluate(student) -> tuple[dict, list]:
            samples = rollouts(student, teacher, tokenizer, test_q, config.eval_samples, config.max_tokens, seed=99)
            return {"test_reverse_kl": reverse_kl(samples), "test_pirate_rate": pirate_rate(tokenizer, samples)}, samples

        student = training.save_weights_and_get_sampling_client().result()  # fresh adapter == base model
        start, before = evaluate(student)
        end, after = start, before
        logger.log(0, **start)
        for step in tqdm(range(1, config.steps + 1), desc="distill", unit="step"):
            batch = rng.sample(train_q, config.questions_per_step)
            samples = rollouts(student, teacher, tokenizer, batch, config.samples_per_question, config.max_tokens,
                               seed=rng.randrange(2**31))
            data = [distill_datum(p, s, t) for p, s, t in samples]
            fwd = training.forward_backward(data, "importance_sampling")
            opt = training.optim_step(types.AdamParams(learning_rate=config.learning_rate, beta1=0.9, beta2=0.95,
                                                       eps=1e-8))
            fwd.result(), opt.result()
            metrics = {"train_reverse_kl": reverse_kl(samples), "train_pirate_rate": pirate_rate(tokenizer, samples)}
            student = training.save_weights_and_get_sampling_client().result()
            if step % config.eval_every == 0 or step == config.steps:
                end, after = evaluate(student)
                metrics.update(end)
            logger.log(step, **metrics)
        logger.close()

    with open(log_dir / "samples.md", "w") as f:
        for i, q in enumerate(test_q):
            b, a = before[i * config.eval_samples][1], after[i * config.eval_samples][1]
            f.write(f"**Q (held out):** {q}\n\n- before: {decode(tokenizer, b.tokens)}\n"
                    f"- after: {decode(tokenizer, a.tokens)}\n\n")
    summary = {"before": start, "after": end}
    print(json.dumps(summary, indent=2))
    (log_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main(parse_config(Config))
