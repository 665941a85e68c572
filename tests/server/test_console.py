"""The console in-process on a tiny random model: curves recorded by the server, sign-in, CSRF, what each
key sees, the hosted console's paths, every page rendering with 200 runs and 10,000 steps, and the jobs pages."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
from tinker import types
from tinker.lib import console_urls
from tinker.proto.request_conv import forward_backward_request_to_proto

from bench.console_pages import fill_store
from tinkerd.control.jobs.manager import token_hash
from tinkerd.server.auth import KEY_COOKIE, identity
from tinkerd.store.db import open_store
from tests.app_client import future_result
from tests.jobs.files import jsonl, sft_rows
from tests.openai_tokenizer import write_char_tokenizer

KEY = {"X-API-Key": "tml-owner"}
PB = {**KEY, "Content-Type": "application/x-protobuf"}


def _fb_body(model_id, seq_id, n):
    datum = types.Datum(model_input=types.ModelInput.from_ints(list(range(3, 3 + n))),
                        loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.arange(4, 4 + n)),
                                        "weights": types.TensorData.from_numpy(np.ones(n, dtype=np.float32))})
    req = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(
        data=[datum], loss_fn="cross_entropy"), model_id=model_id, seq_id=seq_id)
    return forward_backward_request_to_proto(req).SerializeToString()


@pytest.fixture
def trained(api):
    """Three SFT steps (forward_backward + optim_step) and a sampler checkpoint, through the HTTP API."""
    session = api.post("/api/v1/create_session", headers=KEY, json={"tags": [], "user_metadata": {"recipe": "sft"}}).json()
    session = session["session_id"]
    fut = api.post("/api/v1/create_model", headers=KEY, json={
        "session_id": session, "model_seq_id": 0, "base_model": "tiny", "lora_config": {"rank": 4, "seed": 1}}).json()
    model_id = future_result(api, fut["request_id"])["model_id"]
    losses, seq = [], 1
    for step in range(3):
        fb = api.post("/api/v1/forward_backward", headers=PB, content=_fb_body(model_id, seq, 5 + step)).json()
        losses.append(future_result(api, fb["request_id"])["metrics"]["loss:sum"])
        opt = api.post("/api/v1/optim_step", headers=KEY, json={
            "model_id": model_id, "seq_id": seq + 1, "adam_params": {"learning_rate": 0.01 * (step + 1)}}).json()
        assert "error" not in future_result(api, opt["request_id"])
        seq += 2
    fut = api.post("/api/v1/save_weights_for_sampler", headers=KEY,
                   json={"model_id": model_id, "path": "final", "seq_id": seq}).json()
    path = future_result(api, fut["request_id"])["path"]
    return {"session": session, "model_id": model_id, "losses": losses, "path": path}


def _sign_in(api, key="tml-owner"):
    r = api.post("/signin", data={"api_key": key, "next": "/"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return r


def _csrf(html: str) -> str:
    return re.search(r'name="csrf-token" content="([0-9a-f]+)"', html)[1]


def test_curves_are_recorded_by_the_server_and_survive_a_restart(api, trained, tmp_path):
    curves = api.get(f"/api/v1/training_runs/{trained['model_id']}/curves", headers=KEY).json()
    fb, opt = curves["series"]["forward_backward"], curves["series"]["optim_step"]
    assert fb["loss:sum"] == pytest.approx(trained["losses"])  # what the client was told, recorded by the server
    assert fb["tokens"] == [5, 6, 7] and fb["seq_id"] == [1, 3, 5]
    assert fb["loss_per_token"] == pytest.approx([l / n for l, n in zip(trained["losses"], [5, 6, 7])])
    assert opt["learning_rate"] == pytest.approx([0.01, 0.02, 0.03]) and all(s > 0 for s in opt["seconds"])
    later = api.get(f"/api/v1/training_runs/{trained['model_id']}/curves", headers=KEY,
                    params={"after": curves["cursor"]}).json()
    assert later == {"cursor": curves["cursor"], "series": {}}
    assert api.get(f"/api/v1/training_runs/{trained['model_id']}/curves",
                   headers={"X-API-Key": "tml-other"}).status_code == 404
    reopened = open_store(None, tmp_path)  # the same SQLite file a restarted server opens
    assert [r["metrics"]["loss:sum"] for r in reopened.run_steps(trained["model_id"])
            if r["kind"] == "forward_backward"] == pytest.approx(trained["losses"])


def test_sampled_tokens_are_recorded_on_the_run_and_its_session(api, trained):
    fut = api.post("/api/v1/asample", headers=KEY, json={
        "model_path": trained["path"], "prompt": {"chunks": [{"type": "encoded_text", "tokens": [3, 4, 5]}]},
        "num_samples": 2, "sampling_params": {"max_tokens": 4, "temperature": 1.0, "seed": 3}}).json()
    result = future_result(api, fut["request_id"])
    sampled = sum(len(s["tokens"]) for s in result["sequences"])
    curves = api.get(f"/api/v1/training_runs/{trained['model_id']}/curves", headers=KEY).json()
    assert curves["series"]["sample"]["tokens"] == [sampled] and curves["series"]["sample"]["sequences"] == [2]
    metrics = api.get(f"/api/v1/sessions/{trained['session']}/metrics", headers=KEY).json()
    assert metrics["in_flight_samples"] == 0 and sum(metrics["train_tokens_per_s"]) > 0


def test_sign_in_sets_an_httponly_strict_cookie_and_pages_need_it(api, trained):
    r = api.get("/training_runs", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/signin?next=%2Ftraining_runs"
    r = api.post("/signin", data={"api_key": "not-a-key", "next": "/"}, follow_redirects=False)
    assert r.status_code == 401 and "That key was refused" in r.text and KEY_COOKIE not in r.cookies
    r = api.post("/signin", data={"api_key": "tml-attacker"}, headers={"Origin": "https://evil.example"},
                 follow_redirects=False)
    assert r.status_code == 403 and KEY_COOKIE not in r.cookies
    r = api.post("/signin", data={"api_key": "tml-owner", "next": "//evil.example/"}, follow_redirects=False)
    assert r.headers["location"] == "/"  # only paths on this server
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    page = api.get("/")
    assert page.status_code == 200 and trained["model_id"] in page.text and "active" in page.text
    run = api.get(f"/training_runs/{trained['model_id']}")
    assert run.status_code == 200 and "final" in run.text
    assert "recipe=sft" in api.get(f"/sessions/{trained['session']}").text
    csrf = _csrf(page.text)
    assert api.post("/signout", data={"csrf": "wrong"}).status_code == 403
    r = api.post("/signout", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and 'tinkerd_key=""' in r.headers["set-cookie"]


def test_writes_with_the_cookie_need_the_csrf_token(api, trained):
    _sign_in(api)
    html = api.get(f"/checkpoints/{trained['model_id']}/sampler_weights/final").text
    url = f"/api/v1/training_runs/{trained['model_id']}/checkpoints/sampler_weights/final"
    r = api.post(url + "/publish")
    assert r.status_code == 403 and "CSRF" in r.json()["detail"]
    assert api.post(url + "/publish", headers={"X-CSRF-Token": "0" * 32}).status_code == 403
    assert api.post(url + "/publish", headers={"X-CSRF-Token": _csrf(html)}).status_code == 200
    assert "public" in api.get(f"/checkpoints/{trained['model_id']}/sampler_weights/final").text
    assert api.put(url + "/ttl", json={"ttl_seconds": 3600}, headers={"X-CSRF-Token": _csrf(html)}).status_code == 200
    assert api.get(url + "/archive").json()["url"]  # reads need no token
    assert api.delete(url).status_code == 403
    assert api.delete(url, headers={"X-CSRF-Token": _csrf(html)}).status_code == 200
    assert api.get(f"/checkpoints/{trained['model_id']}/sampler_weights/final").status_code == 404


def test_another_key_sees_none_of_it_until_a_checkpoint_is_published(api, trained):
    _sign_in(api)  # the owner's own run is theirs (model_owner is the hosted URN form of the owner id)
    own = api.get(f"/training_runs/{trained['model_id']}").text
    assert "published by another key" not in own and trained["session"] in own
    _sign_in(api, "tml-someone-else")
    runs = api.get("/")
    assert trained["model_id"] not in runs.text and "No training runs yet" in runs.text and "make demo" in runs.text
    assert "No sessions yet" in api.get("/sessions").text and "No checkpoints yet" in api.get("/checkpoints").text
    assert trained["path"] not in api.get("/playground").text
    for url in (f"/training_runs/{trained['model_id']}", f"/sessions/{trained['session']}",
                f"/checkpoints/{trained['model_id']}/sampler_weights/final"):
        assert api.get(url).status_code == 404, url
    assert api.post(f"/api/v1/training_runs/{trained['model_id']}/checkpoints/sampler_weights/final/publish",
                    headers=KEY).status_code == 200
    runs = api.get("/")
    assert trained["model_id"] in runs.text and "published" in runs.text
    run = api.get(f"/training_runs/{trained['model_id']}")
    assert run.status_code == 200 and "owner only" in run.text and 'id="delete"' not in run.text
    checkpoint = api.get(f"/checkpoints/{trained['model_id']}/sampler_weights/final")
    assert checkpoint.status_code == 200 and 'id="delete"' not in checkpoint.text and 'id="publish"' not in checkpoint.text
    assert f'<option value="{trained["path"]}"' in api.get("/playground").text  # others' published ones too


def test_the_sdks_console_urls_open_here_with_the_host_swapped(api, trained):
    _sign_in(api)
    checkpoint = types.ParsedCheckpointTinkerPath.from_tinker_path(trained["path"])
    urls = [console_urls.sessions_console_url(), console_urls.session_console_url(trained["session"]),
            console_urls.training_run_console_url(trained["model_id"]),
            console_urls.checkpoint_console_url(checkpoint.training_run_id, checkpoint.checkpoint_id),
            console_urls.checkpoint_playground_url(trained["path"])]
    for url in urls:
        local = url.replace("https://tinker.thinkingmachines.ai", "")
        r = api.get(local)
        assert r.status_code == 200, local
    assert trained["path"] in api.get(urls[-1].replace("https://tinker.thinkingmachines.ai", "")).text


def test_pages_render_with_200_runs_and_10000_steps(api):
    owner = identity("tml-owner")
    fill_store(api.st.store, owner)
    _sign_in(api)
    first = api.get("/")
    assert first.status_code == 200 and "200 runs" in first.text and "Page 1 of 2" in first.text
    assert first.text.count('<tr data-run="') == 100
    second = api.get("/?page=2")
    assert second.text.count('<tr data-run="') == 100 and "bench-s0:train:0" in second.text  # oldest last
    assert api.get("/?q=recipe=sft").text.count('<tr data-run="') == 0  # run metadata, not the session's
    assert "1 run matching" in api.get("/?q=index=199").text
    sessions = api.get("/sessions?q=recipe=sft")
    assert "100 sessions matching" in sessions.text
    assert api.get("/sessions?status=lapsed").text.count('<tr data-session="') == 0  # all fresh: active
    assert api.get("/checkpoints").text.count('<tr data-path="') == 100
    run = api.get("/training_runs/bench-s0:train:0")
    assert run.status_code == 200 and "sampler_weights/final" in run.text
    curves = api.get("/api/v1/training_runs/bench-s0:train:0/curves").json()["series"]
    assert len(curves["forward_backward"]["loss:sum"]) == 4000 and len(curves["optim_step"]["learning_rate"]) == 4000
    assert api.get("/checkpoints/bench-s0:train:0/sampler_weights/final").status_code == 200
    assert api.get("/sessions/bench-s0").status_code == 200


def test_the_playgrounds_chat_route_takes_the_cookie_with_the_csrf_token_and_records_its_tokens(api, trained,
                                                                                               tmp_path):
    api.st.tokenizers.folders["tiny"] = write_char_tokenizer(tmp_path / "tokenizer")
    _sign_in(api)
    csrf = _csrf(api.get("/playground").text)
    body = {"model": trained["path"], "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "logprobs": True, "max_tokens": 5, "temperature": 1.0, "seed": 2}
    refused = api.post("/v1/chat/completions", json=body)
    assert refused.status_code == 403 and "CSRF" in refused.text
    assert api.post("/v1/chat/completions", json=body, headers={"X-CSRF-Token": "f" * 32}).status_code == 403
    streamed = api.post("/v1/chat/completions", json=body, headers={"X-CSRF-Token": csrf})
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    assert '"logprob"' in streamed.text and streamed.text.rstrip().endswith("data: [DONE]")
    whole = api.post("/v1/chat/completions", json={**body, "stream": False}, headers=KEY).json()
    sampled = api.get(f"/api/v1/training_runs/{trained['model_id']}/curves", headers=KEY).json()["series"]["sample"]
    assert sampled["tokens"][-1] == whole["usage"]["completion_tokens"] and len(sampled["tokens"]) == 2


def test_runs_and_sessions_show_finished_once_the_client_closes(api, trained):
    _sign_in(api)
    assert 'class="badge active" id="run-status">active<' in api.get(f"/training_runs/{trained['model_id']}").text
    assert api.post(f"/api/v1/sessions/{trained['session']}/finish", headers=KEY).status_code == 200
    assert '<span class="badge finished" id="run-status">finished</span>' in api.get(
        f"/training_runs/{trained['model_id']}").text
    assert trained["model_id"] in api.get("/?status=finished").text
    assert trained["model_id"] not in api.get("/?status=active").text
    assert trained["session"] in api.get("/sessions?status=finished").text


def test_a_lapsed_session_and_a_parked_or_unloaded_run_say_so(api, trained):
    _sign_in(api)
    status = lambda: re.search(r'id="run-status">(\w+)<', api.get(f"/training_runs/{trained['model_id']}").text)[1]
    api.st.runs.parked[trained["model_id"]] = 0.0  # as `lifecycle.park` leaves it: state on disk, next request restores
    assert status() == "parked"
    del api.st.runs.parked[trained["model_id"]]
    api.st.scheduler.close_model(trained["model_id"])  # unloaded without parking (a restart without --shutdown-park)
    assert status() == "lapsed"
    api.st.config.session_timeout_seconds = 0.0
    assert trained["session"] in api.get("/sessions?status=lapsed").text


def test_the_jobs_pages_show_a_keys_own_jobs_with_plan_curves_result_and_cancel(api, trained):
    data = jsonl(sft_rows(45))
    upload = api.post("/api/v1/files", files={"file": ("chats.jsonl", data)}, headers=KEY).json()
    queued = api.post("/api/v1/jobs", headers=KEY, json={"kind": "sft", "data_file": upload["id"], "budget": "3 steps"})
    running = api.post("/api/v1/jobs", headers=KEY, json={"kind": "sft", "data": data, "budget": "3 steps"}).json()
    queued = queued.json()
    token = "tml-job-console"  # report as the job's runner does, through its route
    api.st.store.update_job(running["id"], status="running", token_hash=token_hash(token))
    plan = {"learning_rate": 0.00132, "batch_size": 4, "steps": 3,
            "reasons": {"learning_rate": "5e-5 x 10 x (2000/64)^0.781 (Tinker's LoRA rule)"}}
    metrics = [{"step": 0, "held_out_nll": 2.5, "elapsed_s": 1.0}, {"step": 1, "train_nll": 2.25, "lr": 0.00132},
               {"step": 2, "train_nll": 1.75, "lr": 0.00088, "held_out_nll": 1.25}]
    best = {"step": 2, "value": 1.25, "metrics": {"held_out_nll": 1.25}, "sampler_path": trained["path"]}
    progress = {"plan": plan, "phase": "training", "step": 2, "steps": 3, "elapsed_s": 30.0, "metrics": metrics,
                "evals": {"before": {"held_out_nll": 2.5}, "best": best, "last": {"step": 2, "held_out_nll": 1.25}}}
    result = {"sampler_path": trained["path"], "state_path": None, "best_step": 2, "metric": "held_out_nll",
              "better": "lower", "value": 1.25, "stopped": "running"}
    assert api.post(f"/api/v1/jobs/{running['id']}/report", headers={"X-API-Key": token}, json={
        "model_id": trained["model_id"], "job_progress": progress, "job_result": result}).status_code == 200

    _sign_in(api)
    listing = api.get("/jobs").text
    assert '<a href="/jobs" class="on">Jobs</a>' in listing and "2 jobs" in listing
    assert listing.index(running["id"]) < listing.index(queued["id"])  # newest first
    row = listing[listing.index(f'<tr data-job="{running["id"]}"'):]
    row = row[:row.index("</tr>")]
    assert "step 2 of 3" in row and "held_out_nll</span> 2.5 → 1.25 (step 2)" in row and trained["model_id"] in row
    page = api.get(f"/jobs/{running['id']}").text
    assert 'id="job-status">running<' in page
    assert "held_out_nll</span> 2.5 before → 1.25 best (step 2) · lower is better" in page
    assert "Tinker&#39;s LoRA rule" in page and 'id="cancel"' in page and "sent with the job" in page
    points = re.search(r'id="chart-held_out_nll" data-title="held_out_nll" data-points="([^"]+)"', page)[1]
    assert json.loads(html.unescape(points)) == [[0, 2.5], [2, 1.25]]
    assert page.index('id="chart-held_out_nll"') < page.index('id="chart-train_nll"')  # the job's metric first
    link = re.search(r'<a class="mono" href="(/checkpoints/[^"]+)">' + re.escape(trained["path"]), page)[1]
    assert api.get(link).status_code == 200
    playground = html.unescape(re.search(r'href="(/playground\?mode=checkpoint[^"]+)" id="open-playground"', page)[1])
    assert f'<option value="{trained["path"]}" selected' in api.get(playground).text
    assert "chats.jsonl" in api.get(f"/jobs/{queued['id']}").text  # made from the uploaded file
    assert "waiting for its turn" in api.get(f"/jobs/{queued['id']}").text

    cancel = f"/api/v1/jobs/{running['id']}/cancel"
    assert api.post(cancel).status_code == 403  # the cookie alone writes nothing
    # (no runner process in this app, so the cancel ends the job at once, keeping its result)
    assert api.post(cancel, headers={"X-CSRF-Token": _csrf(page)}).json()["status"] == "cancelled"
    after = api.get(f"/jobs/{running['id']}").text
    assert 'id="job-status">cancelled<' in after and 'id="cancel"' not in after and trained["path"] in after

    _sign_in(api, "tml-someone-else")
    assert "No jobs yet" in api.get("/jobs").text
    missing = api.get(f"/jobs/{running['id']}")
    assert missing.status_code == 404 and f"job &#39;{running['id']}&#39; not found" in missing.text
