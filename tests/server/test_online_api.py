"""Online models through the HTTP API on a tiny random model with a character tokenizer, in-process: creating,
reading, listing, deleting; feedback refused naming the field; another key sees nothing (404 to read, chat, feed);
feedback committed to the Store before it is acknowledged; the background learner trains on it (the run's steps
grow, the chat's greedy answer changes); unlearned feedback is learned after a restart, whether the journal
rebuilds the run or the model is rebuilt from its feedback."""

from __future__ import annotations

import html
import json
import re
import sqlite3
import time

import pytest
from fastapi.testclient import TestClient

from tests.openai_tokenizer import write_char_tokenizer
from tinkerd.control.plane import ServerConfig
from tinkerd.engine.runtime import ModelRuntime
from tinkerd.engine.sampler import LocalSampler
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.server.app import create_app
from tinkerd.server.auth import identity
from tinkerd.store.db import DEFAULT_FILE

KEY = {"X-API-Key": "tml-owner"}
OTHER = {"X-API-Key": "tml-other"}
FAST = {"steps": 3, "stop_nll": 0.0, "anchors": 4, "probe_prompts": 2, "anchors_per_step": 2, "anchor_max_tokens": 6,
        "learning_rate": 0.02, "rank": 4}
ASK = [{"role": "user", "content": "hi"}]
WAIT_SECONDS = 120  # a hang guard only; nothing asserts on time


def _runtimes(tokenizer: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=1)
    torch.manual_seed(0)
    return {"tiny": ModelRuntime("tiny", LlamaForCausalLM(config), tokenizer_id=tokenizer)}


def serve(tmp_path, **config):
    """The app on the tiny model (context 256: the chat template's prompts fit), its data in `tmp_path`."""
    tokenizer = str(write_char_tokenizer(tmp_path / "tokenizer"))
    runtimes = _runtimes(tokenizer)
    app = create_app(ServerConfig(data_dir=tmp_path, long_poll_seconds=5, **config), LocalTrainer(runtimes),
                     LocalSampler(runtimes))
    with TestClient(app) as client:
        client.st, client.learner = app.state.tinkerd, app.state.online
        yield client


@pytest.fixture
def api(tmp_path):
    yield from serve(tmp_path)


def create(api, name="helper", **settings) -> dict:
    r = api.post("/api/v1/online", headers=KEY, json={"name": name, "settings": {**FAST, **settings}})
    assert r.status_code == 200, r.text
    return r.json()


def chat(api, name="helper", headers=KEY, max_tokens=12):
    return api.post("/v1/chat/completions", headers={"Authorization": f"Bearer {headers['X-API-Key']}"},
                    json={"model": name, "messages": ASK, "max_tokens": max_tokens, "temperature": 0})


def feed(api, body, name="helper", headers=KEY):
    return api.post(f"/api/v1/online/{name}/feedback", headers=headers, json=body)


def learned(api, name="helper", count=1) -> dict:
    deadline = time.time() + WAIT_SECONDS
    while True:
        row = api.get(f"/api/v1/online/{name}", headers=KEY).json()
        if row["feedback"]["learned"] >= count:
            return row
        assert time.time() < deadline, f"feedback not learned: {row}"
        time.sleep(0.1)


def optim_steps(api, model_id) -> int:
    return sum(1 for s in api.st.store.run_steps(model_id) if s["kind"] == "optim_step")


def test_create_read_list_chat_delete(api):
    made = create(api)
    assert made["status"] == "ready" and made["anchors"] == 4 and made["probe_prompts"] == 2
    assert made["settings"]["steps"] == 3
    assert made["feedback"] == {"stored": 0, "learned": 0, "pending": 0} and made["updates"] == 0
    assert made["sampling_session_id"].endswith(":sample:0")
    assert api.get("/api/v1/online", headers=KEY).json()["total"] == 1
    r = chat(api)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "helper"
    listed = api.get("/v1/models", headers={"Authorization": "Bearer tml-owner"}).json()["data"]
    assert "helper" in [m["id"] for m in listed]
    # the SDK's way in: the inflight sampling session, owned by the same key
    sample = api.post("/api/v1/asample", headers=KEY, json={
        "sampling_session_id": made["sampling_session_id"], "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [3, 4, 5]}]},
        "sampling_params": {"max_tokens": 4, "temperature": 0.0}})
    assert sample.status_code == 200, sample.text
    assert create_again(api).status_code == 400
    assert api.delete("/api/v1/online/helper", headers=KEY).json() == {"name": "helper", "deleted": True}
    assert api.get("/api/v1/online/helper", headers=KEY).status_code == 404
    assert chat(api).status_code == 404


def create_again(api):
    r = api.post("/api/v1/online", headers=KEY, json={"name": "helper"})
    assert "name" in r.json()["detail"], r.text
    return r


def test_another_key_cannot_read_chat_feed_or_delete(api):
    create(api)
    assert api.get("/api/v1/online/helper", headers=OTHER).status_code == 404
    assert api.get("/api/v1/online", headers=OTHER).json()["total"] == 0
    assert chat(api, headers=OTHER).status_code == 404
    assert feed(api, {"messages": ASK, "correction": "no"}, headers=OTHER).status_code == 404
    assert api.delete("/api/v1/online/helper", headers=OTHER).status_code == 404
    assert api.post("/api/v1/online/helper/snapshot", headers=OTHER).status_code == 404
    assert api.get("/api/v1/online/helper", headers=KEY).json()["feedback"]["stored"] == 0


@pytest.mark.parametrize("body, field", [
    ({"correction": "x"}, "messages"),
    ({"messages": [], "correction": "x"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}], "correction": "x"}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}], "correction": "x"}, "messages[0].content"),
    ({"messages": ASK + [{"role": "assistant", "content": "x"}], "correction": "x"}, "messages[1].role"),
    ({"messages": ASK}, "correction"),
    ({"messages": ASK, "correction": ""}, "correction"),
    ({"messages": ASK, "correction": "a", "rating": 1}, "rating"),
    ({"messages": ASK, "preferred": "a"}, "rejected"),
    ({"messages": ASK, "preferred": "a", "rejected": "a"}, "rejected"),
    ({"messages": ASK, "rating": 2, "reply": "a"}, "rating"),
    ({"messages": ASK, "rating": True, "reply": "a"}, "rating"),
    ({"messages": ASK, "rating": 1}, "reply"),
])
def test_malformed_feedback_is_a_400_naming_the_field(api, body, field):
    create(api)
    r = feed(api, body)
    assert r.status_code == 400 and r.json()["detail"].startswith(f"{field}:"), r.text
    assert api.get("/api/v1/online/helper", headers=KEY).json()["feedback"]["stored"] == 0


@pytest.mark.parametrize("body, field", [
    ({"name": "bad name"}, "name"), ({}, "name"), ({"name": "tiny"}, "name"),
    ({"name": "ok", "base_model": "nope"}, "base_model"), ({"name": "ok", "settings": {"stepz": 1}}, "settings.stepz"),
    ({"name": "ok", "settings": {"steps": 0}}, "settings.steps"), ({"name": "ok", "rank": "big"}, "settings.rank"),
    ({"name": "ok", "base_model": "tinker://nope:train:0/futures/x"}, "base_model"),
])
def test_a_bad_create_is_a_400_naming_the_field(api, body, field):
    r = api.post("/api/v1/online", headers=KEY, json=body)
    assert r.status_code in (400, 404) and r.json()["detail"].startswith(f"{field}"), r.text
    assert api.get("/api/v1/online", headers=KEY).json()["total"] == 0


def test_feedback_is_committed_before_it_is_acknowledged(api, tmp_path):
    create(api)
    api.learner.paused = True
    r = feed(api, {"messages": ASK, "correction": "the answer is 42"})
    assert r.status_code == 200 and r.json()["status"] == "stored"
    with sqlite3.connect(tmp_path / DEFAULT_FILE) as other_connection:  # what any other process would read now
        rows = other_connection.execute("SELECT kind, learned FROM online_feedback WHERE id = ?",
                                        (r.json()["id"],)).fetchall()
    assert rows == [("correction", None)]


def test_a_correction_is_learned_in_the_background_and_changes_the_chat(api):
    made = create(api, anchors_per_step=0)  # the random model's anchors are all newlines: not in the way here
    before = chat(api).json()["choices"][0]["message"]["content"]
    steps_before = optim_steps(api, made["training_run_id"])
    assert feed(api, {"messages": ASK, "correction": "zzzz zzzz"}).status_code == 200
    row = learned(api)
    assert row["updates"] == 1 and row["feedback"] == {"stored": 1, "learned": 1, "pending": 0}
    assert optim_steps(api, made["training_run_id"]) == steps_before + FAST["steps"]
    point = row["retention"][-1]
    assert point["update"] == 1 and point["feedback"] == 1 and point["probe_nll"] is not None
    after = chat(api).json()["choices"][0]["message"]["content"]
    assert after != before, "the chat did not see the new weights"
    assert "z" in after


def test_an_update_stops_early_once_the_correction_is_learned(api):
    made = create(api, stop_nll=10.0)  # every reply's NLL is below 10 nats: the first step is the last
    feed(api, {"messages": ASK, "correction": "zzzz"})
    row = learned(api)
    assert row["retention"][-1]["steps"] == 1 and optim_steps(api, made["training_run_id"]) == 1


def test_preferences_and_ratings_are_learned_too(api):
    made = create(api)
    assert feed(api, {"messages": ASK, "preferred": "yes yes", "rejected": "no no"}).status_code == 200
    assert feed(api, {"messages": ASK, "reply": "maybe", "rating": -0.5}).status_code == 200
    row = learned(api, count=2)
    assert row["updates"] >= 1
    online_id = api.st.store.online_model_named(identity("tml-owner"), "helper")["id"]
    kinds = {fb["kind"] for fb in api.st.store.feedback(online_id, learned=True)}
    assert kinds == {"preference", "rating"}
    assert optim_steps(api, made["training_run_id"]) == FAST["steps"] * row["updates"]


def test_snapshot_and_metrics(api):
    create(api)
    path = api.post("/api/v1/online/helper/snapshot", headers=KEY, json={"name": "kept"}).json()["path"]
    assert path.endswith("/sampler_weights/kept")
    r = api.post("/v1/chat/completions", headers={"Authorization": "Bearer tml-owner"},
                 json={"model": path, "messages": ASK, "max_tokens": 4})
    assert r.status_code == 200, r.text
    feed(api, {"messages": ASK, "correction": "ok"})
    learned(api)
    text = api.get("/metrics").text
    assert "tinkerd_online_feedback_stored 1.0" in text and "tinkerd_online_feedback_learned 1.0" in text
    assert "tinkerd_online_updates 1.0" in text and "tinkerd_online_models 1.0" in text


@pytest.mark.parametrize("journal, park", [(0, 0), (1, 0), (0, 30)],
                         ids=["rebuilt-from-feedback", "rebuilt-by-the-journal", "parked-by-a-graceful-stop"])
def test_feedback_acknowledged_but_not_learned_is_learned_after_a_restart(tmp_path, journal, park):
    for api in serve(tmp_path, restore_point_every_steps=journal, shutdown_park_seconds=park):
        made = create(api)
        feed(api, {"messages": ASK, "correction": "first"})
        learned(api)
        api.learner.paused = True
        assert feed(api, {"messages": ASK, "correction": "second"}).status_code == 200
        assert api.get("/api/v1/online/helper", headers=KEY).json()["feedback"]["pending"] == 1
    for api in serve(tmp_path, restore_point_every_steps=journal, shutdown_park_seconds=park):
        row = learned(api, count=2)
        assert row["feedback"] == {"stored": 2, "learned": 2, "pending": 0}
        assert chat(api).status_code == 200
        if journal or park:  # the same run, rebuilt from its journal or restored from its parked state, carries on
            assert row["training_run_id"] == made["training_run_id"] and row["updates"] == 2
        else:  # a new run relearned both pieces of feedback
            assert row["training_run_id"] != made["training_run_id"]
            assert any(p.get("rebuilt") for p in row["retention"])


def test_the_console_page_shows_feedback_updates_and_the_retention_curve(api):
    create(api)
    feed(api, {"messages": ASK, "correction": "ok"})
    learned(api)
    api.cookies.clear()
    assert api.post("/signin", data={"api_key": "tml-owner", "next": "/"}, follow_redirects=False).status_code == 303
    listing = api.get("/online")
    assert listing.status_code == 200 and 'href="/online/helper"' in listing.text
    page = api.get("/online/helper")
    assert page.status_code == 200
    assert 'id="feedback-stored">1<' in page.text and 'id="updates">1<' in page.text
    points = re.search(r'id="chart-probe"[^>]*data-points="([^"]*)"', page.text).group(1)
    assert [p[0] for p in json.loads(html.unescape(points))] == [0, 1]  # at creation, after update 1
    api.cookies.clear()
    api.post("/signin", data={"api_key": "tml-other", "next": "/"}, follow_redirects=False)
    assert api.get("/online/helper").status_code == 404


def test_an_online_model_can_start_from_a_checkpoint(api):
    create(api)
    path = api.post("/api/v1/online/helper/snapshot", headers=KEY, json={"name": "start"}).json()["path"]
    r = api.post("/api/v1/online", headers=KEY, json={"name": "second", "base_model": path, "settings": FAST})
    assert r.status_code == 200, r.text
    assert r.json()["source"] == path and r.json()["base_model"] == "tiny" and r.json()["status"] == "ready"
    assert chat(api, "second").status_code == 200
    other = api.post("/api/v1/online", headers=OTHER, json={"name": "theirs", "base_model": path})
    assert other.status_code == 404 and other.json()["detail"].startswith("base_model"), other.text
