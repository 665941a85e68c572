"""Example files for task-level jobs (`tinkerd tune`, docs/jobs.md), made from the recipes' own data so the
tasks are known to learn on the embedded model:

    python -m cookbook.jobs_data OUT_DIR     # writes sft_quillmark.jsonl, dpo_arithmetic.jsonl, rl_one_word.jsonl

- sft: cookbook/sft's Quillmark questions and answers in OpenAI chat format;
- dpo: cookbook/dpo's generated pairs (a short correct answer preferred to a padded or a wrong one);
- rl: cookbook/rl_grader's one-word questions, graded by a regex (`ONE_WORD`: the truth rl_grader hides from its
  model grader), each asked in two wordings.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from cookbook.dpo.train import make_pairs
from cookbook.rl_grader.train import INSTRUCTION, QUESTIONS
from cookbook.sft.train import DATA as QUILLMARK

ONE_WORD = r"^\W*[A-Za-z][A-Za-z'-]*[.!]?\W*$"
RL_GRADER = {"type": "regex", "pattern": ONE_WORD}


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def sft_rows(n: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in QUILLMARK.read_text().splitlines()][:n]
    return [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
            for r in rows]


def dpo_rows(n: int = 60, seed: int = 0) -> list[dict]:
    return [{"prompt": p["question"], "chosen": p["chosen"], "rejected": p["rejected"]}
            for p in make_pairs(random.Random(seed), n, set())]


def rl_rows(wordings: int = 1) -> list[dict]:
    forms = ["{q} {i}", "{i} {q}"][:wordings]
    return [{"prompt": f.format(q=q, i=INSTRUCTION)} for f in forms for q in QUESTIONS]


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/jobs-data")
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in [("sft_quillmark", sft_rows()), ("dpo_arithmetic", dpo_rows(320)),
                       ("rl_one_word", rl_rows(wordings=2))]:
        (out / f"{name}.jsonl").write_text(jsonl(rows))
        print(f"{out / name}.jsonl: {len(rows)} rows")
    (out / "rl_grader.json").write_text(json.dumps(RL_GRADER) + "\n")
