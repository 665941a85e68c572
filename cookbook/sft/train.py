"""Chat SFT: teach the model an invented island, Quillmark, from 160 question/answer pairs.

    python -m cookbook.sft.train [base_url=http://127.0.0.1:8000] [epochs=5] [learning_rate=5e-4] ...

The data (cookbook/sft/data/quillmark.jsonl) has 40 facts, each asked in 5 ways; the 5th wording of
every fact is held out. We track the held-out NLL per answer token (lower = the model finds the right
answer more likely when asked in words it never trained on), and before/after training we answer every
held-out question greedily and count how many answers contain the fact's key phrase ("recall").
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

from tinker import types
from tqdm import tqdm

from cookbook.common import (BaseConfig, MetricsLogger, completion_tokens, decode, log_dir_for, messages,
                             parse_config, prompt_tokens, sample_all, service_client, sft_datum, stop_params)

DATA = Path(__file__).parent / "data" / "quillmark.jsonl"


@dataclasses.dataclass
class Config(BaseConfig):
    data: str = str(DATA)
    epochs: int = 8
    batch_size: int = 16
    learning_rate: float = 1e-3
    eval_every: int = 5  # steps between held-out evaluations
    max_steps: int | None = None  # stop early (smoke tests)
    num_examples: int = 6  # held-out answers printed (recall is measured on all of them)
    recall: bool = True  # answer the held-out questions greedily before and after training


def load(path: str) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in open(path)]
    return [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "test"]


def to_datum(tokenizer, row: dict) -> types.Datum:
    return sft_datum(prompt_tokens(tokenizer, messages(row["question"])), completion_tokens(tokenizer, row["answer"]))


def nll_per_token(outputs, data: list[types.Datum]) -> float:
    """-Σ weights·logprob / Σ weights over a forward(_backward) result: mean NLL of the answer tokens."""
    total = sum(-(out["logprobs"].to_numpy() * d.loss_fn_inputs["weights"].to_numpy()).sum()
                for out, d in zip(outputs, data))
    return float(total / sum(d.loss_fn_inputs["weights"].to_numpy().sum() for d in data))


def recall(answers: list[str], rows: list[dict]) -> float:
    return sum(r["key"].lower() in a.lower() for a, r in zip(answers, rows)) / len(rows)


def greedy_answers(sampler, tokenizer, questions: list[str]) -> list[str]:
    prompts = [prompt_tokens(tokenizer, messages(q)) for q in questions]
    results = sample_all(sampler, prompts, stop_params(tokenizer, max_tokens=40, temperature=0.0))
    return [decode(tokenizer, seqs[0].tokens) for seqs in results]


def main(config: Config) -> dict:
    log_dir = log_dir_for(config, "sft")
    train_rows, test_rows = load(config.data)
    with service_client(config, log_dir) as service:
        training = service.create_lora_training_client(base_model=config.base_model, rank=config.rank,
                                                       seed=config.seed).result()
        tokenizer = training.get_tokenizer()
        train_data = [to_datum(tokenizer, r) for r in train_rows]
        test_data = [to_datum(tokenizer, r) for r in test_rows]
        questions = [r["question"] for r in test_rows] if config.recall else []
        # A fresh LoRA adapter (B = 0) is exactly the base model: sample it for the "before" answers.
        before = greedy_answers(training.save_weights_and_get_sampling_client().result(), tokenizer, questions)

        logger = MetricsLogger(log_dir, config, plot_name="sft.png")
        steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
        total = steps_per_epoch * config.epochs if config.max_steps is None else config.max_steps
        rng = random.Random(config.seed)
        start_nll = nll_per_token(training.forward(test_data, "cross_entropy").result().loss_fn_outputs, test_data)
        logger.log(0, test_nll=start_nll)
        order: list[int] = []
        for step in tqdm(range(1, total + 1), desc="sft", unit="step"):
            if len(order) < config.batch_size:  # a new epoch: reshuffle
                order += rng.sample(range(len(train_data)), len(train_data))
            batch = [train_data[i] for i in order[:config.batch_size]]
            del order[:config.batch_size]
            lr = config.learning_rate * (1 - (step - 1) / total)  # linear decay to 0
            # Both requests go out before we wait: the server runs them back to back.
            fwd = training.forward_backward(batch, "cross_entropy")
            opt = training.optim_step(types.AdamParams(learning_rate=lr, beta1=0.9, beta2=0.95, eps=1e-8))
            metrics = {"train_nll": nll_per_token(fwd.result().loss_fn_outputs, batch), "lr": lr}
            opt.result()
            if step % config.eval_every == 0 or step == total:
                out = training.forward(test_data, "cross_entropy").result().loss_fn_outputs
                metrics["test_nll"] = nll_per_token(out, test_data)
            logger.log(step, **metrics)
        end_nll = logger.rows[-1]["test_nll"]
        logger.close()

        after = greedy_answers(training.save_weights_and_get_sampling_client().result(), tokenizer, questions)
    with open(log_dir / "samples.md", "w") as f:
        for i, (q, b, a) in enumerate(zip(questions, before, after)):
            f.write(f"**Q (held out):** {q}\n\n- before: {b}\n- after: {a}\n\n")
            if i < config.num_examples:
                print(f"Q (held out): {q}\n  before: {b}\n  after:  {a}")
    summary = {"test_nll_before": start_nll, "test_nll_after": end_nll, "drop": 1 - end_nll / start_nll}
    if questions:
        summary.update(recall_before=recall(before, test_rows), recall_after=recall(after, test_rows))
        print(f"held-out recall: {summary['recall_before']:.0%} -> {summary['recall_after']:.0%} of answers name the fact")
    print(f"held-out NLL per answer token: {start_nll:.3f} -> {end_nll:.3f} ({100 * summary['drop']:.0f}% lower)")
    (log_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main(parse_config(Config))
