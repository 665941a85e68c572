"""Online models on the real embedded model, through a real `tinkerd serve`: facts taught one correction at a time
through the feedback route are recalled on paraphrased questions (never taught) through the chat route, while the
held-out anchors' NLL rises by less than a measured bound; and feedback acknowledged but not yet learned when the
server is killed (SIGKILL) is learned after the restart. The SDK samples the same weights through the model's
inflight sampling session.

`make test` teaches 3 facts; `make test-online` (TINKERD_ONLINE_FACTS=10) the issue's 10."""

from __future__ import annotations

import os
import sqlite3
import time

import pytest
import tinker
from tinker import types

from bench.online import KEY, Session, recalled
from bench.online_facts import FACTS
from tests.e2e.conftest import ServerProcess
from tinkerd.store.db import DEFAULT_FILE

pytestmark = pytest.mark.slow
N_FACTS = int(os.environ.get("TINKERD_ONLINE_FACTS", "3"))
# The held-out probe's mean reply NLL (nats per token; 0.70-0.72 for the base model) may rise by at most this much
# over the session. Measured with the default settings (docs/online.md): -0.05 after 3 facts and at most +0.16 over
# 10 (three runs); the defaults of before (9 anchors at full weight) rose +0.86 within 5 facts.
PROBE_NLL_BOUND = {3: 0.4, 10: 0.5}.get(N_FACTS, 0.6)
WAIT_SECONDS = 900  # a hang guard only; nothing asserts on time


def wait_learned(session: Session, count: int) -> dict:
    deadline = time.time() + WAIT_SECONDS
    while True:
        row = session.read()
        if row["feedback"]["learned"] >= count:
            return row
        assert row["status"] == "ready" and time.time() < deadline, row
        time.sleep(0.5)


def sdk_sample(url: str, row: dict, question: str) -> str:
    """The online model's greedy answer through the SDK: a SamplingClient of its inflight sampling session."""
    with tinker.ServiceClient(base_url=url, api_key=KEY) as service:
        sampler = tinker.SamplingClient(service.holder, sampling_session_id=row["sampling_session_id"],
                                        base_model=row["base_model"])
        tokenizer = sampler.get_tokenizer()
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=False)
        out = sampler.sample(types.ModelInput.from_ints(tokenizer.encode(prompt, add_special_tokens=False)), 1,
                             types.SamplingParams(max_tokens=24, temperature=0.0)).result()
        return tokenizer.decode(out.sequences[0].tokens)


def test_facts_taught_one_at_a_time_are_recalled_on_paraphrases_and_the_probe_stays_in_its_bound(tmp_path):
    with ServerProcess(tmp_path) as server:
        session = Session(server.url)
        start = session.create({})["retention"][0]
        for i, (question, correction, _, _) in enumerate(FACTS[:N_FACTS]):
            session.teach(question, correction)
            wait_learned(session, i + 1)
        answers = {keyword: [session.ask(p)[0] for p in paraphrases] for _, _, keyword, paraphrases in FACTS[:N_FACTS]}
        row = session.read()
        sdk_answer = sdk_sample(server.url, row, FACTS[0][3][0])
    assert recalled(sdk_answer, FACTS[0][2]), sdk_answer  # the SDK samples the same inflight weights
    hits = [recalled(a, keyword) for keyword, replies in answers.items() for a in replies]
    assert sum(hits) >= 0.9 * len(hits), answers
    end = row["retention"][-1]
    assert row["updates"] >= 1 and end["learned_total"] == N_FACTS
    assert end["probe_nll"] - start["probe_nll"] < PROBE_NLL_BOUND, row["retention"]


def test_feedback_acknowledged_before_a_kill_9_is_learned_after_the_restart(tmp_path):
    question, correction, keyword, paraphrases = FACTS[0]
    server = ServerProcess(tmp_path)
    try:
        session = Session(server.url)
        session.create({})
        acknowledged = session.teach(question, correction)
        server.kill()  # SIGKILL right after the acknowledgement: an update takes many seconds
    finally:
        server.stop()
    with sqlite3.connect(tmp_path / DEFAULT_FILE) as db:
        learned = db.execute("SELECT learned FROM online_feedback WHERE id = ?", (acknowledged["id"],)).fetchall()
    assert learned == [(None,)], "the feedback was learned before the kill; the test proves nothing"
    with ServerProcess(tmp_path) as server:
        session = Session(server.url)
        row = wait_learned(session, 1)
        assert row["feedback"] == {"stored": 1, "learned": 1, "pending": 0}
        answers = [session.ask(p)[0] for p in paraphrases]
    assert any(recalled(a, keyword) for a in answers), answers
