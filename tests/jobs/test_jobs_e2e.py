"""Jobs on the embedded model through a real `tinkerd serve`: one per kind (the sft one from an uploaded file; each
ends within its step budget, its trained checkpoint beats the start on the held-out rows, the result samples
through the SDK (and, for sft, the OpenAI-compatible route) and the run is an ordinary run of the caller), cancel
of a running job, and kill -9 of the server mid-job (the restarted server resumes the job from its last state
checkpoint and ends no worse than an uninterrupted run with the same seed).

Small files and explicit small batches keep each job to a few steps; the planner's own choices are measured in
docs/jobs.md."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import ServerProcess
from tests.jobs.files import RL_GRADER, dpo_rows, jsonl, rl_rows, sft_rows

pytestmark = pytest.mark.slow
ALICE, BOB = "tml-alice", "tml-bob"
SMALL = {"batch_size": 4, "eval_every": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("tinkerd-jobs"))
    yield proc
    proc.stop()


def http(url: str, key: str = ALICE) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60)


def submit(url: str, kind: str, rows: list[dict], budget: str, key: str = ALICE, **fields) -> dict:
    reply = http(url, key).post("/api/v1/jobs", json={"kind": kind, "data": jsonl(rows), "budget": budget, **fields})
    assert reply.status_code == 200, reply.text
    return reply.json()


def wait(url: str, job_id: str, until=lambda job: job["status"] in ("succeeded", "failed", "cancelled"),
         key: str = ALICE, timeout: float = 900) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = http(url, key).get(f"/api/v1/jobs/{job_id}").json()
        if until(job):
            return job
        assert job["status"] not in ("failed",), job["error"]
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {job['status']} at step {job['progress']}")


def trained_better(job: dict) -> tuple[float, float]:
    """(before, best) of the held-out metric, after checking the best checkpoint is a trained one."""
    result, before = job["result"], job["evals"]["before"][job["result"]["metric"]]
    assert job["status"] == "succeeded", job["error"]
    assert result["best_step"] > 0, "no trained checkpoint beat the starting model"
    assert (result["value"] < before) if result["better"] == "lower" else (result["value"] > before)
    return before, result["value"]


def samples(url: str, sampler_path: str, prompt: str) -> str:
    service = tinker.ServiceClient(base_url=url, api_key=ALICE)
    sampler = service.create_sampling_client(model_path=sampler_path).result()
    tokenizer = sampler.get_tokenizer()
    tokens = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    out = sampler.sample(types.ModelInput.from_ints(list(tokens)), 1,
                         types.SamplingParams(max_tokens=16, temperature=0.0)).result()
    return tokenizer.decode(out.sequences[0].tokens, skip_special_tokens=True)


def test_sft_job_learns_within_budget_and_its_result_samples(server):
    uploaded = http(server.url).post("/api/v1/files", files={"file": ("chats.jsonl", jsonl(sft_rows(44)))}).json()
    made = http(server.url).post("/api/v1/jobs", json={"kind": "sft", "data_file": uploaded["id"], "budget": "4 steps",
                                                       "hyperparameters": {"batch_size": 4, "eval_every": 4}})
    assert made.status_code == 200, made.text  # from an uploaded file (the other jobs send their data inline)
    job = wait(server.url, made.json()["id"])
    trained_better(job)
    assert job["data_file"] == uploaded["id"]
    assert job["progress"]["step"] <= 4 and job["plan"]["steps"] == 4
    assert job["plan"]["held_out_rows"] == 20 and job["plan"]["train_rows"] == 24
    assert samples(server.url, job["result"]["sampler_path"], "What is the capital of Quillmark?").strip()
    chat = httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {ALICE}"}, timeout=120,
                      json={"model": job["result"]["sampler_path"], "max_tokens": 16, "temperature": 0,
                            "messages": [{"role": "user", "content": "What is the capital of Quillmark?"}]})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"].strip()  # the OpenAI route
    runs = http(server.url).get("/api/v1/training_runs").json()["training_runs"]
    assert job["training_run_id"] in [r["training_run_id"] for r in runs]  # an ordinary run of the caller
    assert http(server.url, BOB).get(f"/api/v1/jobs/{job['id']}").status_code == 404


@pytest.mark.jobs_heavy
def test_cancel_keeps_the_best_checkpoint_so_far(server):
    job = submit(server.url, "sft", sft_rows(44), "200 steps", hyperparameters={**SMALL, "patience": 100})
    wait(server.url, job["id"], until=lambda j: (j["progress"]["step"] or 0) >= 1)
    assert http(server.url).post(f"/api/v1/jobs/{job['id']}/cancel").json()["status"] in ("cancelling", "cancelled")
    done = wait(server.url, job["id"])
    assert done["status"] == "cancelled" and done["progress"]["step"] < 200
    assert done["result"]["stopped"] == "cancelled" and done["result"]["sampler_path"].startswith("tinker://")
    assert samples(server.url, done["result"]["sampler_path"], "Hi!").strip()


@pytest.mark.jobs_heavy
def test_dpo_job_raises_held_out_preference_accuracy(server):
    job = wait(server.url, submit(server.url, "dpo", dpo_rows(44), "4 steps", hyperparameters=SMALL)["id"])
    trained_better(job)
    assert samples(server.url, job["result"]["sampler_path"], "What is 3 + 4?").strip()


@pytest.mark.jobs_heavy
def test_rl_job_raises_the_graders_pass_rate(server):
    job = wait(server.url, submit(server.url, "rl", rl_rows(), "4 steps", grader=RL_GRADER,
                                  hyperparameters={"batch_size": 6, "eval_every": 2, "max_tokens": 8})["id"])
    trained_better(job)
    assert set(job["evals"]["before"]) >= {"held_out_pass_rate_greedy", "held_out_pass_rate_t1"}
    assert samples(server.url, job["result"]["sampler_path"], "Name a fruit. Answer with one word.").strip()


def _runner_alive(job_id: str) -> bool:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if job_id.encode() in cmdline.read_bytes():
                return True
        except OSError:
            continue
    return False


@pytest.mark.jobs_heavy
def test_a_job_survives_kill_9_of_the_server(tmp_path):
    from tinkerd.local_server import free_port

    port, data = free_port(), tmp_path / "data"
    fields = dict(hyperparameters={**SMALL, "seed": 3})
    first = ServerProcess(data, port=port)
    try:
        job = submit(first.url, "sft", sft_rows(44), "6 steps", **fields)
        wait(first.url, job["id"], until=lambda j: (j["progress"]["step"] or 0) >= 3)  # past the step-2 checkpoint
    finally:
        first.kill()
    deadline = time.time() + 30
    while _runner_alive(job["id"]) and time.time() < deadline:
        time.sleep(0.2)
    assert not _runner_alive(job["id"]), "the runner outlived its server"
    second = ServerProcess(data, port=port)
    try:
        resumed = wait(second.url, job["id"])
        uninterrupted = wait(second.url, submit(second.url, "sft", sft_rows(44), "6 steps", **fields)["id"])
    finally:
        second.stop()
    trained_better(resumed)
    assert resumed["progress"]["step"] == uninterrupted["progress"]["step"] == 6
    assert [m["step"] for m in resumed["metrics"]] == list(range(7))  # steps 3.. were redone once, not twice
    assert resumed["result"]["value"] <= uninterrupted["result"]["value"] * 1.01
