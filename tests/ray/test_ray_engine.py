"""`--engine ray` beyond the contract suite: a torch-free front end, detached actors that outlive
the driver that started them, epoch fencing between two front ends, and an actor killed mid-run.

Tier 1: needs the ray extra (`make test-ray`); skipped when ray is not installed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.ray.cluster import driver_env, ensure_ray, tiny_placement

pytestmark = pytest.mark.ray

import ray  # noqa: E402  (after the importorskip in tests.ray.cluster)

from tinkerd.backends.fencing import StaleEpoch  # noqa: E402
from tinkerd.engine.interface import ordered_op  # noqa: E402
from tinkerd.engine.interface import AdapterSpec  # noqa: E402
from tinkerd.backends.ray_engine import EngineLost, RaySampler, RayTrainer, attach, remove, start_or_attach  # noqa: E402
from tinkerd.protocol.types import AdamParams, BadRequest, Datum, ForwardBackwardCall  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SPEC = AdapterSpec(rank=4, seed=0)
TOKENS = np.array([3, 5, 7, 9, 11, 13, 15, 17], np.int64)
DATUM = Datum(TOKENS[:-1], {"target_tokens": TOKENS[1:], "weights": np.ones(7, np.float32)})


def _call(model_id, seq_id=0, forward_only=False, data=(DATUM,)):
    return ForwardBackwardCall(model_id, seq_id, "cross_entropy", {}, forward_only, list(data))


@pytest.fixture
def placement():
    ensure_ray()
    placement = tiny_placement("tiny")
    yield placement
    remove(placement.key)


def _driver(code: str, address: str, timeout: float = 120) -> dict:
    """Run `code` as a separate Ray driver (a front-end process); it prints one JSON line."""
    prelude = "import json, sys, ray\nray.init(address=sys.argv[1], logging_level='warning')\n"
    env = driver_env(ROOT)
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), address], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_front_end_serves_on_ray_without_importing_torch(placement, tmp_path):
    start_or_attach(placement)
    out = _driver(f"""
        from fastapi.testclient import TestClient
        from pathlib import Path
        from tinkerd.backends.ray_engine import RaySampler, RayTrainer, attach
        from tinkerd.server.app import create_app
        from tinkerd.control.plane import ServerConfig

        trainer = RayTrainer([attach({placement.key!r})])
        app = create_app(ServerConfig(data_dir=Path({str(tmp_path)!r}), long_poll_seconds=5), trainer, RaySampler(trainer))
        with TestClient(app, headers={{"X-API-Key": "tml-test"}}) as client:
            session = client.post("/api/v1/create_session", json={{"tags": []}}).json()["session_id"]
            future = client.post("/api/v1/create_model", json={{"session_id": session, "model_seq_id": 0,
                                 "base_model": "tiny", "lora_config": {{"rank": 4}}}}).json()
            while True:
                result = client.post("/api/v1/retrieve_future", json={{"request_id": future["request_id"]}}).json()
                if result.get("type") != "try_again":
                    break
            sample = client.post("/api/v1/asample", json={{"base_model": "tiny", "num_samples": 1,
                                 "prompt": {{"chunks": [{{"type": "encoded_text", "tokens": [3, 5, 7]}}]}},
                                 "sampling_params": {{"max_tokens": 4, "temperature": 0.0}}}}).json()
            while True:
                sampled = client.post("/api/v1/retrieve_future", json={{"request_id": sample["request_id"]}}).json()
                if sampled.get("type") != "try_again":
                    break
        print(json.dumps({{"created": result, "sampled": len(sampled["sequences"][0]["tokens"]),
                          "torch": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))}}))
    """, ensure_ray())
    assert out["created"]["type"] == "create_model" and out["sampled"] == 4
    assert out["torch"] == []


def test_actors_outlive_the_front_end_that_started_them_and_a_new_one_reattaches_by_name(placement):
    out = _driver(f"""
        import numpy as np
        from ray import cloudpickle
        import tests.conftest, tests.ray.cluster
        from tests.ray.cluster import tiny_runtimes
        from tinkerd.engine.interface import ordered_op
        from tinkerd.engine.interface import AdapterSpec
        from tinkerd.backends.ray_engine import ActorPlacement, RayTrainer, start_or_attach
        from tinkerd.protocol.types import AdamParams, Datum, ForwardBackwardCall

        for module in (tests.conftest, tests.ray.cluster):
            cloudpickle.register_pickle_by_value(module)
        trainer = RayTrainer([start_or_attach(ActorPlacement({placement.key!r}, tiny_runtimes, ("tiny", 0)))])
        tokens = np.array({TOKENS.tolist()}, np.int64)
        datum = Datum(tokens[:-1], {{"target_tokens": tokens[1:], "weights": np.ones(7, np.float32)}})
        trainer.create_adapter("run", "tiny", AdapterSpec(rank=4, seed=0))
        trainer.forward_backward(ForwardBackwardCall("run", 1, "cross_entropy", {{}}, False, [datum]))
        with ordered_op("run", 2):
            trainer.optim_step("run", AdamParams(learning_rate=0.05))
        after = trainer.forward_backward(ForwardBackwardCall("run", 0, "cross_entropy", {{}}, True, [datum]))
        print(json.dumps({{"logprobs": after.outputs[0]["logprobs"].tolist()}}))
    """, ensure_ray())  # that driver has exited; its detached actor has not
    trainer = RayTrainer([attach(placement.key)])
    assert trainer.model_actor == {"run": "tiny"}
    again = trainer.forward_backward(_call("run", forward_only=True)).outputs[0]["logprobs"]
    np.testing.assert_array_equal(again, np.array(out["logprobs"], np.float32))
    trainer.forward_backward(_call("run", seq_id=3))  # the run goes on where the first front end left it
    with ordered_op("run", 2):  # and its order is remembered: an old seq_id never runs again
        assert trainer.optim_step("run", AdamParams(learning_rate=0.05))["grad_norm:mean"] > 0


def test_a_newer_front_end_fences_off_the_older_one(placement):
    old = RayTrainer([start_or_attach(placement)])
    old.create_adapter("run", "tiny", SPEC)
    new = RayTrainer([attach(placement.key)])  # claims a newer epoch
    with pytest.raises(StaleEpoch, match="stale"):
        old.optim_step("run", AdamParams())
    with pytest.raises(StaleEpoch):
        old.forward_backward(_call("run", seq_id=1))
    assert new.forward_backward(_call("run", seq_id=1)).metrics["loss:sum"] > 0


def _kill_mid_call(trainer: RayTrainer, handle, call) -> Exception | None:
    """Start `call` on a thread, SIGKILL the actor's process while it runs; return what the call raised."""
    pid = ray.get(handle.describe.remote())["pid"]
    raised: list = []

    def run():
        try:
            trainer.forward_backward(call)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=60)
    return raised[0] if raised else None


def test_a_killed_actor_fails_in_flight_training_as_a_server_error_and_its_runs_fail_fast(placement, tmp_path):
    from tinkerd.control.futures import FutureBoard
    from tinkerd.control.scheduler import Job, Outcome, Scheduler
    from tinkerd.store.db import open_store

    handle = start_or_attach(placement)
    trainer = RayTrainer([handle])
    trainer.create_adapter("doomed", "tiny", SPEC)
    big = [DATUM] * 3000  # long enough to be killed in flight
    error = _kill_mid_call(trainer, handle, _call("doomed", seq_id=1, data=big))
    assert isinstance(error, EngineLost) and "'doomed' was lost" in str(error)
    with pytest.raises(EngineLost, match="'doomed' was lost: its engine actor died"):
        trainer.optim_step("doomed", AdamParams())  # never silently run on the restarted, empty actor

    async def through_the_scheduler():
        board = FutureBoard(open_store(None, tmp_path))
        board.bind_loop(asyncio.get_running_loop())
        scheduler = Scheduler(board, trainer.forward_backward_many, RaySampler(trainer))
        scheduler.open_model("doomed", next_seq=2)  # seq_id 1 was the killed call
        futures = [board.create("owner", "forward_backward"), board.create("owner", "optim_step")]
        scheduler.submit_ordered("doomed", 2, Job(futures[0], "forward_backward", call=_call("doomed", 2),
                                                  encode=lambda r: Outcome(json={})))
        scheduler.submit_ordered("doomed", 3, Job(futures[1], "optim_step", lambda: Outcome(
            json=trainer.optim_step("doomed", AdamParams()))))
        scheduler.start()
        for _ in range(500):
            rows = [board.store.future(f) for f in futures]
            if all(r["state"] != "pending" for r in rows):
                break
            await asyncio.sleep(0.01)
        await scheduler.stop()
        return rows

    for row in asyncio.run(through_the_scheduler()):
        assert row["state"] == "error" and row["category"] == "server", row
        assert "'doomed' was lost" in row["error"]
    # Ray restarted the actor (empty); new runs train on it
    trainer.create_adapter("fresh", "tiny", SPEC)
    assert trainer.forward_backward(_call("fresh", seq_id=1)).metrics["loss:sum"] > 0
    with pytest.raises(BadRequest, match="not loaded"):
        trainer.forward_backward(_call("never-created", seq_id=1))


def test_ray_trainer_samples_through_vllm_on_the_weights_the_actor_published(placement, tmp_path):
    """`--engine ray --sampler vllm`: the actor writes each adapter version as a PEFT folder, a (fake) vLLM
    loads it, and its samples equal the actor's own sampler on the same weights."""
    from tests.conftest import make_tiny_runtime
    from tests.vllm.conftest import FAST_RETRY, train_steps
    from tests.vllm.fake_vllm import FakeVllm
    from tinkerd.engine.interface import SampleTask
    from tinkerd.engine.sampler import LocalSampler
    from tinkerd.protocol.types import SamplingParams
    from tinkerd.backends.vllm_sampler import VllmSampler
    from tinkerd.backends.assemble import vllm_engine

    fake = FakeVllm(LocalSampler({"tiny": make_tiny_runtime("tiny")}), served_name="tiny", base_model="tiny",
                    max_loras=2).start()
    ray_trainer = RayTrainer([start_or_attach(placement)])
    trainer, sampler = vllm_engine(ray_trainer, "tiny", tmp_path / "adapters", fake.url)
    sampler.close()
    sampler = VllmSampler(fake.url, {"tiny": "tiny"}, trainer.versions, retry=FAST_RETRY)
    try:
        trainer.create_adapter("run", "tiny", SPEC)
        train_steps(trainer, "run", 3)
        published = trainer.snapshot_for_sampler("run")
        assert Path(published.uri).parent.parent == tmp_path / "adapters"
        params = SamplingParams(max_tokens=6, temperature=1.0, seed=7, stop_at_eos=False)
        through_vllm = sampler.sample(SampleTask("r1", published, [3, 5, 7], 2, params))
        in_the_actor = RaySampler(ray_trainer)
        in_memory = ray_trainer.snapshot_for_sampler("run")
        in_the_actor.submit(SampleTask("r2", in_memory, [3, 5, 7], 2, params))
        finished = []
        while not finished:
            finished = in_the_actor.step()
        (_, own), = finished
        assert [s.tokens for s in through_vllm.sequences] == [s.tokens for s in own.sequences]
        for ours, theirs in zip(through_vllm.sequences, own.sequences):
            np.testing.assert_allclose(ours.logprobs, theirs.logprobs, atol=1e-4)
    finally:
        sampler.close()
        fake.stop()


def test_the_actors_inflight_target_is_one_slot_that_old_clients_follow(placement):
    """`--engine ray`: the inflight target lives in the actor next to its sampler, so a client created before
    a later inflight save samples the newer weights, and the slot is reused, not added."""
    from tests.vllm.conftest import train_steps
    from tinkerd.engine.interface import SampleTask
    from tinkerd.protocol.types import SamplingParams

    trainer = RayTrainer([start_or_attach(placement)])
    sampler = RaySampler(trainer)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, stop_at_eos=False)

    def tokens(ref, request_id):
        sampler.submit(SampleTask(request_id, ref, [3, 5, 7], 1, greedy))
        finished = []
        while not finished:
            finished = sampler.step()
        (_, result), = finished
        return result.sequences[0].tokens

    trainer.create_adapter("run", "tiny", SPEC)
    train_steps(trainer, "run", 1)
    inflight = trainer.publish_inflight("run")
    before = tokens(inflight, "before")
    train_steps(trainer, "run", 6, tokens=(3, 5, 7, 20, 21, 22, 23, 24), lr=0.2)
    assert trainer.publish_inflight("run") == inflight
    after = tokens(inflight, "after")
    assert after != before, "training did not change the greedy answer; the test cannot tell the weights apart"
    assert after == tokens(trainer.snapshot_for_sampler("run"), "snapshot")
