"""End to end on each store: the in-process app on a tiny random model makes a run and a checkpoint,
a second app on the same `--store` URL (a restart) lists both, and the offline CLI reads them too."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tinkerd import cli
from tinkerd.engine.sampler import LocalSampler
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.server.app import create_app
from tinkerd.control.plane import ServerConfig
from tinkerd.store.db import DEFAULT_FILE
from tests.conftest import make_tiny_runtime
from tests.app_client import future_result

KEY = {"X-API-Key": "tml-owner"}


def _app(data_dir, store_url):
    runtimes = {"tiny": make_tiny_runtime()}
    return create_app(ServerConfig(data_dir=data_dir, store=store_url, long_poll_seconds=5), LocalTrainer(runtimes),
                      LocalSampler(runtimes))


def test_runs_and_checkpoints_survive_a_restart(store_url, tmp_path):
    data_dir = tmp_path / "data"
    with TestClient(_app(data_dir, store_url)) as api:
        session = api.post("/api/v1/create_session", headers=KEY, json={"tags": ["t"]}).json()["session_id"]
        fut = api.post("/api/v1/create_model", headers=KEY, json={
            "session_id": session, "model_seq_id": 0, "base_model": "tiny",
            "lora_config": {"rank": 4, "seed": 1}}).json()
        model_id = future_result(api, fut["request_id"])["model_id"]
        fut = api.post("/api/v1/save_weights", headers=KEY, json={"model_id": model_id, "path": "w", "seq_id": 1})
        assert "error" not in future_result(api, fut.json()["request_id"])
    checkpoint = f"tinker://{model_id}/weights/w"

    with TestClient(_app(data_dir, store_url)) as api:  # the restart
        runs = api.get("/api/v1/training_runs", headers=KEY).json()
        assert [r["training_run_id"] for r in runs["training_runs"]] == [model_id]
        listed = api.get(f"/api/v1/training_runs/{model_id}/checkpoints", headers=KEY).json()
        assert [c["tinker_path"] for c in listed["checkpoints"]] == [checkpoint]
        assert listed["checkpoints"][0]["size_bytes"] > 0
        assert api.get(f"/api/v1/sessions/{session}", headers=KEY).status_code == 200

    assert not (data_dir / DEFAULT_FILE).exists()  # the rows went where --store said, not to the data dir
    args = cli._parser().parse_args(["checkpoints", "--data-dir", str(data_dir), "--store", store_url])
    assert checkpoint in cli.list_checkpoints(args)
