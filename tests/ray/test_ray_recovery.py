"""An engine actor killed in the middle of a run, or the node under it lost: the server rebuilds the run
on the restarted actor from its snapshot and request journal, the requests in flight get their results,
and the run equals one that was never interrupted, bit for bit. Without a journal the old contract holds
(a clear `server` error).

Tier 1: needs the ray extra (`make test-ray`); skipped when ray is not installed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.ray.cluster import driver_env, ensure_ray, tiny_placement

pytestmark = pytest.mark.ray

import ray  # noqa: E402  (after the importorskip in tests.ray.cluster)

from tinkerd.backends.ray_engine import RaySampler, RayTrainer, remove, start_or_attach  # noqa: E402
from tinkerd.server.app import create_app  # noqa: E402
from tinkerd.control.plane import ServerConfig  # noqa: E402
from tests.app_client import future_result  # noqa: E402
from tests.control.test_journal import _sample  # noqa: E402
from tests.control.test_lifecycle import DATUM, Run  # noqa: E402

ADAM = {"adam_params": {"learning_rate": 0.01}}
BIG = {"forward_backward_input": {"data": [DATUM] * 20000, "loss_fn": "cross_entropy"}}  # seconds: long enough to kill in flight


@pytest.fixture
def served(tmp_path):
    ensure_ray()
    placement = tiny_placement("tiny")
    handle = start_or_attach(placement)
    trainer = RayTrainer([handle])

    def serve(restore_point_every_steps: int) -> TestClient:
        app = create_app(ServerConfig(data_dir=tmp_path, long_poll_seconds=5, restore_point_every_steps=restore_point_every_steps),
                         trainer, RaySampler(trainer))
        client = TestClient(app)
        client.handle = handle
        return client

    yield serve
    remove(placement.key)


def _steps(run, kill_actor=None) -> dict:
    """Two steps, a sampler snapshot, then a big forward_backward + optim_step (the actor may die under it)."""
    losses = [run.train_step() for _ in range(2)]
    sampler = run.sampler(0)
    fb, step = run.post("forward_backward", BIG).json()["request_id"], run.post("optim_step", ADAM).json()["request_id"]
    if kill_actor is not None:
        kill_actor()
    losses.append(future_result(run.client, fb)["metrics"]["loss:sum"])
    assert "metrics" in future_result(run.client, step), future_result(run.client, step)
    tokens = future_result(run.client, _sample(run.client, sampler))
    return {"losses": losses, "samples": tokens["sequences"], "logprobs": run.logprobs()}


def _killer(handle):
    pid = ray.get(handle.describe.remote())["pid"]

    def kill():
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
    return kill


def test_a_killed_actor_is_rebuilt_from_the_journal_and_the_run_carries_on_exactly(served):
    with served(restore_point_every_steps=2) as client:
        client.st = client.app.state.tinkerd
        run = Run(client, seed=4)
        interrupted = _steps(run, _killer(client.handle))
        assert client.st.runs.rebuilds == {run.model_id: 1}  # the kill hit the run in flight
        reference = _steps(Run(client, seed=4))
        assert interrupted["losses"] == reference["losses"]
        assert interrupted["samples"] == reference["samples"]
        np.testing.assert_array_equal(interrupted["logprobs"], reference["logprobs"])
        assert run.train_step() > 0  # and it trains on


def test_without_a_journal_a_killed_actor_fails_the_run_clearly(served):
    with served(restore_point_every_steps=0) as client:
        run = Run(client, seed=4)
        run.train_step()
        fb = run.post("forward_backward", BIG).json()["request_id"]
        _killer(client.handle)()
        failed = future_result(client, fb)
        assert failed["category"] == "server" and "was lost" in failed["error"], failed


def test_losing_the_node_of_the_actor_moves_it_to_another_and_the_run_carries_on_exactly():
    """`tests/ray/node_loss.py` in its own process: a Cluster of two one-GPU (logical) worker nodes."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "tests.ray.node_loss"], cwd=root, capture_output=True, text=True,
                          env=driver_env(root), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["node_after"] != result["node_before"] and result["gpu_ids_after"], result
    assert result["rebuilds"] == [1], result  # the node went with the forward_backward in flight
    assert result["losses_equal"] and result["samples_equal"] and result["logprobs_equal"], result
