"""Run lifecycle on the vLLM path: a published sampler version of a run that was unloaded answers 410
like an in-memory snapshot does, and the run resumes on its next training request."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from tests.conftest import make_tiny_runtime
from tests.server.test_lifecycle import Run, _sample
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.server import lifecycle
from tinkerd.server.app import create_app
from tinkerd.server.state import ServerConfig
from tinkerd.vllm.serve import vllm_engine


def test_a_published_version_of_a_parked_run_answers_410_and_the_run_resumes(tmp_path, fake):
    trainer, sampler = vllm_engine(LocalTrainer({"tiny": make_tiny_runtime("tiny")}), "tiny", tmp_path, fake.url,
                                   vllm_model="tiny-served")
    app = create_app(ServerConfig(data_dir=tmp_path, long_poll_seconds=5), trainer, sampler)
    try:
        with TestClient(app) as client:
            st = app.state.tinkerd
            run = Run(client)
            run.train_step()
            sampler_id = run.sampler(0)
            assert (tmp_path / "adapters" / run.model_id / "v1").is_dir()
            assert _sample(client, sampler_id).status_code == 200

            st.config.session_timeout_seconds = 0.2
            time.sleep(0.3)
            client.portal.call(lifecycle.sweep, st)
            assert set(st.runs.parked) == {run.model_id}
            st.config.session_timeout_seconds = 600
            r = _sample(client, sampler_id)
            assert r.status_code == 410 and f"{run.model_id}@v1" in r.json()["detail"], r.text
            assert run.train_step() > 0  # restored on its next request
    finally:
        sampler.close()
