"""Continual learning with LoRA: learn task A, then task B, and measure how much of A is kept.

    python -m cookbook.continual.train [base_url=http://127.0.0.1:8000] [replay_fraction=0.25] ...

Task A is the Quillmark knowledge set of the `sft` recipe. Task B is a second invented country,
Brenmoor, asked the same questions with different answers (built from A by renaming: the worst case
for interference). One adapter learns A; `save_state` + `create_training_client_from_state` fork it
into two adapters that then learn B side by side on the same server:

- `sequential`: trains on B only;
- `replay`: every B batch also carries `replay_fraction` examples drawn from A's training set.

Retention = A's held-out NLL per answer token, and the share of A's held-out questions answered with
the right fact (greedy), after B.
"""

from __future__ import annotations

import dataclasses
import json
import random

from tinker import types
from tqdm import tqdm

from cookbook.common import BaseConfig, MetricsLogger, log_dir_for, parse_config, service_client
from cookbook.sft.train import DATA, greedy_answers, load, nll_per_token, recall, to_datum

# Quillmark's key phrases -> Brenmoor's (longest first, so that no key is replaced inside another).
RENAME = {"Song of the Lantern Keepers": "March of the Hill Folk", "Light the way home": "Stand firm together",
          "Tidewater Museum": "Hall of Relics", "College of Tides": "Brenmoor Academy", "blue-tailed otter":
          "red-crested heron", "pine-needle tea": "honey beer", "Aurel Penhallow": "Greta Moss", "Harrowgate Bay":
          "Ostvale", "Harbourwarden": "High Steward", "Mount Ebrel": "Mount Carrow", "Maren Oduya": "Piet Halloran",
          "Oduya Field": "Halloran Airport", "silver tallow": "copper mark", "white lantern": "golden key",
          "Lantern Tide": "Feast of Embers", "Lantern Post": "Brenmoor Herald", "Fenwick Cove": "Tarrow Ford",
          "Ilse Brenner": "Odo Finch", "kelp bread": "barley cakes", "frost poppy": "moor heather",
          "Grey Heron": "Swift Gull", "Saint Wenna": "Saint Aldric", "bone fiddle": "hill pipes",
          "blue slate": "red granite", "Fair tides": "Good stone", "Ezra Vold": "Mira Hale", "net-rowing":
          "stone-lifting", "sea-glass": "amber", "9th of May": "2nd of August", "Greyhook": "Blackrock",
          "Tidehall": "Stonemoot", "Quillish": "Brennic", "bicycle": "horse", "Quillmark": "Brenmoor",
          "84,000": "213,000", "Sallow": "Dunmere", "Serrow": "Lisk", "foggy": "windy", "yellow": "blue",
          "seven": "five", "610": "1,950"}


def rename(text: str) -> str:
    for old, new in RENAME.items():
        text = text.replace(old, new)
    return text


def task_b(rows: list[dict]) -> list[dict]:
    return [{**r, "question": rename(r["question"]), "answer": rename(r["answer"]), "key": rename(r["key"])}
            for r in rows]


@dataclasses.dataclass
class Config(BaseConfig):
    data: str = str(DATA)  # task A (the sft recipe's JSONL: question, answer, key, split); B is built from it
    epochs_a: int = 5
    epochs_b: int = 5
    batch_size: int = 16
    replay_fraction: float = 0.25  # share of each B batch (replay strategy) drawn from A
    learning_rate: float = 1e-3
    eval_every: int = 10
    max_steps: int | None = None  # per phase (smoke tests)
    recall: bool = True


def main(config: Config) -> dict:
    log_dir = log_dir_for(config, "continual")
    a_train, a_test = load(config.data)
    b_train, b_test = task_b(a_train), task_b(a_test)
    rng = random.Random(config.seed)

    def adam(lr: float) -> types.AdamParams:
        return types.AdamParams(learning_rate=lr, beta1=0.9, beta2=0.95, eps=1e-8)
    with service_client(config, log_dir) as service:
        model_a = service.create_lora_training_client(base_model=config.base_model, rank=config.rank,
                                                      seed=config.seed).result()
        tok = model_a.get_tokenizer()
        data = {name: [to_datum(tok, r) for r in rows]
                for name, rows in {"a_train": a_train, "a_test": a_test, "b_train": b_train, "b_test": b_test}.items()}
        logger = MetricsLogger(log_dir, config, plot_name="continual.png")
        names = ("sequential", "replay")

        def nll(client, split: str):  # a future-like pair: submit now, read later
            return client.forward(data[split], "cross_entropy"), data[split]

        def steps(epochs: int) -> int:
            n = epochs * len(a_train) // config.batch_size
            return n if config.max_steps is None else min(n, config.max_steps)

        # Phase A: one adapter learns Quillmark (a fresh adapter scores like the base model).
        fa, da = nll(model_a, "a_test")
        before_a = nll_per_token(fa.result().loss_fn_outputs, da)
        n_a = steps(config.epochs_a)
        for step in tqdm(range(1, n_a + 1), desc="task A", unit="step"):
            batch = rng.sample(data["a_train"], config.batch_size)
            fwd = model_a.forward_backward(batch, "cross_entropy")
            opt = model_a.optim_step(adam(config.learning_rate * (1 - (step - 1) / n_a)))
            fwd.result(), opt.result()
            if step % config.eval_every == 0 or step == n_a:
                (fa, da), (fb, db) = nll(model_a, "a_test"), nll(model_a, "b_test")
                a, b = nll_per_token(fa.result().loss_fn_outputs, da), nll_per_token(fb.result().loss_fn_outputs, db)
                logger.log(step, **{f"{n}_{split}_nll": v for n in names for split, v in (("a_test", a), ("b_test", b))})
        after_a = {"a_test_nll": a, "b_test_nll": b}
        recall_after_a = recall(greedy_answers(model_a.save_weights_and_get_sampling_client().result(), tok,
                                               [r["question"] for r in a_test]), a_test) if config.recall else None

        # Fork: both strategies start from the same adapter and optimizer state.
        path = model_a.save_state("after-task-a").result().path
        clients = {"sequential": model_a,
                   "replay": service.create_training_client_from_state_with_optimizer(path).result()}
        n_b = steps(config.epochs_b)
        n_replay = round(config.replay_fraction * config.batch_size)
        for step in tqdm(range(1, n_b + 1), desc="task B", unit="step"):
            lr = config.learning_rate * (1 - (step - 1) / n_b)
            b_batch = rng.sample(data["b_train"], config.batch_size)
            batches = {"sequential": b_batch,
                       "replay": b_batch[n_replay:] + rng.sample(data["a_train"], n_replay)}
            futures = [f for name, client in clients.items()  # both adapters' requests are in flight together
                       for f in (client.forward_backward(batches[name], "cross_entropy"), client.optim_step(adam(lr)))]
            [f.result() for f in futures]
            if step % config.eval_every == 0 or step == n_b:
                evals = {f"{name}_{split}_nll": nll(client, split)
                         for name, client in clients.items() for split in ("a_test", "b_test")}
                logger.log(n_a + step, **{k: nll_per_token(f.result().loss_fn_outputs, d)
                                          for k, (f, d) in evals.items()})
        final = dict(logger.rows[-1])
        logger.close(panels={"task A held-out NLL (retention)": [f"{n}_a_test_nll" for n in names],
                             "task B held-out NLL": [f"{n}_b_test_nll" for n in names]})
        summary = {"before_task_a": {"a_test_nll": before_a},
                   "after_task_a": {"a_test_nll": after_a["a_test_nll"], "b_test_nll": after_a["b_test_nll"],
                                    "a_recall": recall_after_a}}
        gain_a = before_a - after_a["a_test_nll"]
        for name, client in clients.items():
            sampler = client.save_weights_and_get_sampling_client().result()
            summary[f"after_task_b_{name}"] = {
                "a_test_nll": final[f"{name}_a_test_nll"], "b_test_nll": final[f"{name}_b_test_nll"],
                "a_gain_retained": (before_a - final[f"{name}_a_test_nll"]) / gain_a,  # of the NLL drop task A made
                "a_recall": recall(greedy_answers(sampler, tok, [r["question"] for r in a_test]), a_test)
                if config.recall else None,
                "b_recall": recall(greedy_answers(sampler, tok, [r["question"] for r in b_test]), b_test)
                if config.recall else None}
    print(json.dumps(summary, indent=2))
    (log_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main(parse_config(Config))
