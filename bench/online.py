"""A measured online-learning session on the embedded model: facts taught one correction at a time.

`python -m bench.online [--facts 30] [--url URL] [--settings '{"steps": 6}'] [--out FILE]` starts `tinkerd serve`
(unless --url), creates an online model, and for each fact of `bench.online_facts`: sends the correction through
`POST /api/v1/online/NAME/feedback`, chats with the model (through `/v1/chat/completions`) until the update that
learns it is published (latency *while learning*), then asks the fact's two paraphrased questions (never taught)
and reads the retention probe from `GET /api/v1/online/NAME`. At the end every fact's paraphrases
are asked again (final recall) and the idle chat latency is measured. `--report FILE` prints a results file's table. Prints one JSON line (the summary) and writes the summary
plus one row per fact and the probe prompts' answers before and after to --out (default bench/online-results.json), which docs/online.md reports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.online_facts import FACTS
from tinkerd.control.online.examples import PROBE_PROMPTS

KEY = "tml-bench"
CHAT_MAX_TOKENS = 32
IDLE_CHATS = 20
GENERAL = PROBE_PROMPTS[:3]  # held-out probe prompts, answered before and after the session


def recalled(text: str, keyword: str) -> bool:
    return keyword.lower() in text.lower()


class Session:
    def __init__(self, url: str, name: str = "bench-online") -> None:
        self.http = httpx.Client(base_url=url, headers={"X-API-Key": KEY, "Authorization": f"Bearer {KEY}"},
                                 timeout=900)
        self.name = name

    def create(self, settings: dict) -> dict:
        r = self.http.post("/api/v1/online", json={"name": self.name, "settings": settings})
        r.raise_for_status()
        return r.json()

    def read(self) -> dict:
        return self.http.get(f"/api/v1/online/{self.name}").raise_for_status().json()

    def teach(self, question: str, correction: str) -> dict:
        r = self.http.post(f"/api/v1/online/{self.name}/feedback",
                           json={"messages": [{"role": "user", "content": question}], "correction": correction})
        r.raise_for_status()
        return r.json()

    def ask(self, question: str) -> tuple[str, float]:
        started = time.perf_counter()
        r = self.http.post("/v1/chat/completions", json={
            "model": self.name, "messages": [{"role": "user", "content": question}],
            "max_tokens": CHAT_MAX_TOKENS, "temperature": 0})
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"], time.perf_counter() - started


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 3)


def run(url: str, n_facts: int, settings: dict) -> dict:
    s = Session(url)
    started = time.perf_counter()
    made = s.create(settings)
    create_seconds = time.perf_counter() - started
    base = made["retention"][0]
    general_before = {q: s.ask(q)[0] for q in GENERAL}
    rows, busy_latency = [], []
    for i, (question, correction, keyword, paraphrases) in enumerate(FACTS[:n_facts]):
        s.teach(question, correction)
        while True:  # chat while the update runs; each answer measures latency under learning
            _, seconds = s.ask(question)
            row = s.read()
            if row["feedback"]["learned"] >= i + 1:
                break
            busy_latency.append(seconds)
        point = row["retention"][-1]
        answers = [s.ask(p)[0] for p in paraphrases]
        rows.append({"fact": i + 1, "keyword": keyword, "update_seconds": point.get("seconds"),
                     "steps": point.get("steps"),
                     "paraphrase_recall": sum(recalled(a, keyword) for a in answers) / len(answers),
                     "answers": answers, "anchor_nll": point["anchor_nll"], "probe_nll": point["probe_nll"]})
        print(json.dumps({"progress": rows[-1]}), flush=True)
    finals = []
    for question, correction, keyword, paraphrases in FACTS[:n_facts]:
        answers = [s.ask(p)[0] for p in paraphrases]
        finals.append({"keyword": keyword, "recalled": sum(recalled(a, keyword) for a in answers) / len(answers),
                       "answers": answers})
    idle_latency = [s.ask(FACTS[k % n_facts][3][0])[1] for k in range(IDLE_CHATS)]
    general_after = {q: s.ask(q)[0] for q in GENERAL}
    last = s.read()
    end = last["retention"][-1]
    update_seconds = [r["update_seconds"] for r in rows if r["update_seconds"] is not None]
    summary = {
        "bench": "online", "facts": n_facts, "settings": last["settings"], "create_seconds": round(create_seconds, 1),
        "final_paraphrase_recall": round(statistics.mean(f["recalled"] for f in finals), 3),
        "facts_recalled_final": sum(f["recalled"] > 0 for f in finals),
        "immediate_paraphrase_recall": round(statistics.mean(r["paraphrase_recall"] for r in rows), 3),
        "anchor_nll": {"start": base["anchor_nll"], "end": end["anchor_nll"]},
        "probe_nll": {"start": base["probe_nll"], "end": end["probe_nll"],
                      "max_rise": max(r["probe_nll"] - base["probe_nll"] for r in rows)},
        "update_seconds": {"p50": percentile(update_seconds, 0.5), "max": max(update_seconds)},
        "chat_seconds_learning": {"n": len(busy_latency), "p50": percentile(busy_latency, 0.5),
                                  "p99": percentile(busy_latency, 0.99)},
        "chat_seconds_idle": {"n": len(idle_latency), "p50": percentile(idle_latency, 0.5),
                              "p99": percentile(idle_latency, 0.99)},
        "chat_max_tokens": CHAT_MAX_TOKENS, "cpu_threads": os.cpu_count(),
    }
    general = [{"question": q, "before": general_before[q], "after": general_after[q]} for q in GENERAL]
    return {"summary": summary, "per_fact": rows, "final": finals, "general": general}


def markdown(result: dict) -> str:
    """The per-fact table docs/online.md shows, from a results file."""
    lines = ["| fact | update s | steps | paraphrase recall (this fact, right after) | anchor NLL | probe NLL |",
             "|---|---|---|---|---|---|"]
    for row in result["per_fact"]:
        lines.append(f"| {row['fact']} {row['keyword']} | {row['update_seconds']:.1f} | {row.get('steps', '')} | "
                     f"{row['paraphrase_recall']:.1f} | {row['anchor_nll']:.3f} | {row['probe_nll']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--facts", type=int, default=30)
    parser.add_argument("--url", help="a running tinkerd (default: start one on the embedded model)")
    parser.add_argument("--settings", default="{}", help="the online model's learning settings, as JSON")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("online-results.json"))
    parser.add_argument("--model-cache", help="tinkerd serve --model-cache")
    parser.add_argument("--report", type=Path, help="print the markdown table of a results file and exit")
    args = parser.parse_args(argv)
    if args.report:
        print(markdown(json.loads(args.report.read_text())))
        return
    settings = json.loads(args.settings)
    if args.url:
        result = run(args.url, args.facts, settings)
    else:
        from tinkerd.local_server import LocalServer

        with tempfile.TemporaryDirectory() as data_dir, \
                LocalServer(Path(data_dir), model_cache=Path(args.model_cache) if args.model_cache else None) as server:
            result = run(server.url, args.facts, settings)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
