"""Run lifecycle on the vLLM path: a published sampler version of a run that was unloaded answers 410
like an in-memory snapshot does, and the run resumes on its next training request; after a crash the
replay publishes a sampling session's weights again, under a new name, and the session samples them."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from fastapi.testclient import TestClient

from tests.conftest import make_tiny_runtime
from tests.app_client import future_result
from tests.control.test_journal import _sample as _sample_async
from tests.control.test_lifecycle import Run, _sample
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.control import lifecycle
from tinkerd.server.app import create_app
from tinkerd.control.plane import ServerConfig
from tinkerd.backends.assemble import vllm_engine


def test_a_published_version_of_a_parked_run_answers_410_and_the_run_resumes(tmp_path, fake):
    trainer, sampler = vllm_engine(LocalTrainer({"tiny": make_tiny_runtime("tiny")}), "tiny", tmp_path / "adapters",
                                   fake.url, vllm_model="tiny-served")
    app = create_app(ServerConfig(data_dir=tmp_path, long_poll_seconds=5), trainer, sampler)
    try:
        with TestClient(app) as client:
            st = app.state.tinkerd
            run = Run(client)
            run.train_step()
            sampler_id = run.sampler(0)
            (published,) = (tmp_path / "adapters" / run.model_id).iterdir()
            assert published.name == f"v1.{trainer.versions.generation}"
            assert _sample(client, sampler_id).status_code == 200

            st.config.session_timeout_seconds = 0.2
            time.sleep(0.3)
            client.portal.call(lifecycle.sweep, st)
            assert set(st.runs.parked) == {run.model_id}
            st.config.session_timeout_seconds = 600
            r = _sample(client, sampler_id)
            assert r.status_code == 410 and f"{run.model_id}@{published.name}" in r.json()["detail"], r.text
            assert run.train_step() > 0  # restored on its next request
    finally:
        sampler.close()


def _vllm_app(data, fake, **config):
    inner = LocalTrainer({"tiny": make_tiny_runtime("tiny")})
    trainer, sampler = vllm_engine(inner, "tiny", data / "adapters", fake.url, vllm_model="tiny-served")
    app = create_app(ServerConfig(data_dir=data, long_poll_seconds=5, **config), trainer, sampler)
    client = TestClient(app)
    client.inner, client.vllm = inner, sampler
    return client


def test_after_a_crash_a_sampling_session_samples_its_republished_weights(tmp_path, fake):
    with _vllm_app(tmp_path, fake, restore_point_every_steps=1) as client:  # leaves without parking: a crash
        run = Run(client)
        run.train_step()  # snapshot after seq_id 2
        sampler_id = run.sampler(0)  # seq_id 3: in the journal only
        before = client.app.state.tinkerd.store.sampling_session(sampler_id)["adapter_uri"]
        expected = future_result(client, _sample_async(client, sampler_id))["sequences"]
    client.vllm.close()

    client = _vllm_app(tmp_path, fake, restore_point_every_steps=1)
    gate, load = threading.Event(), client.inner.load_state
    client.inner.load_state = lambda *a, **k: gate.wait(30) and load(*a, **k)  # the replay's first job waits
    try:
        with client:
            st = client.app.state.tinkerd
            assert not Path(before).exists()  # the old process's folders are gone
            request = _sample_async(client, sampler_id)  # names the old folder: waits for the replay
            assert st.scheduler.pending_samples == 0 and len(st.runs.recovering[run.model_id]) == 1
            gate.set()
            assert future_result(client, request)["sequences"] == expected  # the same weights, seeded
            after = st.store.sampling_session(sampler_id)["adapter_uri"]
            assert after != before and Path(after).is_dir()
    finally:
        client.vllm.close()
