"""The job routes on the in-process app (tiny model, no job runner: without `jobs_url` jobs stay queued): bad
input is a 400 naming what to fix and stores nothing; each key sees only its jobs; queued jobs cancel at once;
job tokens act as their job's owner and only while the job runs."""

from __future__ import annotations

import pytest

from tests.app_client import app_client
from tests.jobs.files import dpo_rows, jsonl, sft_rows
from tinkerd.control.jobs.manager import token_hash

ALICE, BOB = {"X-API-Key": "tml-alice"}, {"X-API-Key": "tml-bob"}


@pytest.fixture
def client(tmp_path):
    yield from app_client(tmp_path)


def job(client, headers=ALICE, **fields):
    body = {"kind": "sft", "data": jsonl(sft_rows(45)), "budget": "3 steps", **fields}
    return client.post("/api/v1/jobs", json=body, headers=headers)


def test_bad_input_is_400_naming_line_and_field_and_stores_nothing(client, tmp_path):
    lines = jsonl(sft_rows(45)).splitlines()
    lines[11] = '{"prompt": "Where is Quillmark?", "completion": 7}'
    reply = job(client, data="\n".join(lines))
    assert reply.status_code == 400
    assert reply.json()["detail"] == "line 12, field 'completion': expected a non-empty string, got int 7"
    assert job(client, kind="dpo").json()["detail"] == (  # chat rows are not preference pairs
        "line 1, field 'messages[1].role': the last message must be the user's, got 'assistant'")
    assert job(client, kind="sft", budget="0 steps").status_code == 400
    assert job(client, base_model="gpt-9").json()["detail"].startswith("base_model: 'gpt-9' is not served here")
    assert client.get("/api/v1/jobs", headers=ALICE).json() == {"jobs": [], "total": 0}
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())


def test_each_key_sees_only_its_jobs(client):
    mine = job(client).json()
    assert mine["status"] == "queued" and mine["rows"] == 45 and mine["kind"] == "sft"
    job(client, headers=BOB, kind="dpo", data=jsonl(dpo_rows(40)))
    assert [j["id"] for j in client.get("/api/v1/jobs", headers=ALICE).json()["jobs"]] == [mine["id"]]
    assert client.get(f"/api/v1/jobs/{mine['id']}", headers=BOB).status_code == 404
    assert client.post(f"/api/v1/jobs/{mine['id']}/cancel", headers=BOB).status_code == 404
    assert client.get(f"/api/v1/jobs/{mine['id']}", headers=ALICE).json()["id"] == mine["id"]


def test_a_queued_job_cancels_at_once(client):
    queued = job(client).json()
    cancelled = client.post(f"/api/v1/jobs/{queued['id']}/cancel", headers=ALICE).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished"] is not None


def test_one_running_job_per_key_the_rest_queue(client, monkeypatch):
    manager = client.app.state.jobs
    started = []
    monkeypatch.setattr(manager, "url", "http://runner.invalid")
    monkeypatch.setattr(manager, "_start", lambda j: (started.append(j["id"]),
                                                      client.st.store.update_job(j["id"], status="running")))
    a1, a2, b1 = job(client).json(), job(client).json(), job(client, headers=BOB).json()
    manager.tick()
    assert started == [a1["id"], b1["id"]]  # alice's second waits for her first
    client.st.store.update_job(a1["id"], status="succeeded")
    manager.tick()
    assert started[-1] == a2["id"]


def test_a_job_token_is_its_owner_while_the_job_runs(client):
    queued = job(client).json()
    token = "tml-job-test-token"
    client.st.store.update_job(queued["id"], status="running", token_hash=token_hash(token))
    as_runner = {"X-API-Key": token}
    seen = client.get(f"/api/v1/jobs/{queued['id']}", headers=as_runner).json()
    assert seen["id"] == queued["id"] and "resume" in seen  # the runner, and only it, gets its resume state
    assert "resume" not in client.get(f"/api/v1/jobs/{queued['id']}", headers=ALICE).json()
    assert client.post(f"/api/v1/jobs/{queued['id']}/report", json={}, headers=ALICE).status_code == 401
    assert client.post(f"/api/v1/jobs/{queued['id']}/report", json={"status": "succeeded"},
                       headers=as_runner).json()["status"] == "succeeded"
    assert client.get(f"/api/v1/jobs/{queued['id']}", headers=as_runner).status_code == 401  # erased at the end


def test_a_restart_requeues_running_jobs_and_a_dead_runner_fails_its_job(client, tmp_path):
    manager, store = client.app.state.jobs, client.st.store
    running, cancelling, dead = job(client).json(), job(client).json(), job(client, headers=BOB).json()
    store.update_job(running["id"], status="running", token_hash="old")
    store.update_job(cancelling["id"], status="cancelling")
    manager.resume_all()
    assert store.job(running["id"])["status"] == "queued" and store.job(running["id"])["token_hash"] is None
    assert store.job(cancelling["id"])["status"] == "cancelled"

    class Exited:
        returncode = 3

        def poll(self):
            return 3
    store.update_job(dead["id"], status="running")
    manager.folder(dead["id"]).joinpath("runner.log").write_text("Traceback ...\nRuntimeError: boom\n")
    manager.procs[dead["id"]] = Exited()
    manager.tick()
    failed = client.get(f"/api/v1/jobs/{dead['id']}", headers=BOB).json()
    assert failed["status"] == "failed" and "exited with code 3" in failed["error"] and "boom" in failed["error"]
