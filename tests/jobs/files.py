"""Small job files the job tests write, made from the cookbook recipes' own data so the tasks are known to learn:
sft from cookbook/sft's Quillmark facts (chat format), dpo from cookbook/dpo's generated pairs, rl from
cookbook/rl_grader's one-word questions with a regex grader (the truth rl_grader keeps from its model grader)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from cookbook.dpo.train import make_pairs
from cookbook.rl_grader.train import INSTRUCTION, QUESTIONS
from cookbook.sft.train import DATA as QUILLMARK

ONE_WORD = r"^\W*[A-Za-z][A-Za-z'-]*[.!]?\W*$"
RL_GRADER = {"type": "regex", "pattern": ONE_WORD}


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def sft_rows(n: int = 60) -> list[dict]:
    rows = [json.loads(line) for line in QUILLMARK.read_text().splitlines()][:n]
    return [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
            for r in rows]


def dpo_rows(n: int = 60, seed: int = 0) -> list[dict]:
    return [{"prompt": p["question"], "chosen": p["chosen"], "rejected": p["rejected"]}
            for p in make_pairs(random.Random(seed), n, set())]


def rl_rows() -> list[dict]:
    return [{"prompt": f"{q} {INSTRUCTION}"} for q in QUESTIONS]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text(jsonl(rows))
    return path
