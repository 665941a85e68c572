"""One app on a tiny random model for the whole fuzz tier (started on first use, stopped at exit), with a
training run, a sampler and a checkpoint of the fuzz key, so generated ids sometimes hit real rows."""

from __future__ import annotations

import atexit
import tempfile
from pathlib import Path

from fastapi.testclient import TestClient

from tinkerd.control.plane import ServerConfig
from tinkerd.engine.sampler import LocalSampler
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.server.app import create_app
from tests.conftest import make_tiny_runtime
from tests.fuzz.conftest import KEY

_RUNTIMES = {"tiny": make_tiny_runtime()}
APP = create_app(ServerConfig(data_dir=Path(tempfile.mkdtemp(prefix="tinkerd-fuzz-")), long_poll_seconds=0.2,
                              max_decompressed_bytes=1 << 20), LocalTrainer(_RUNTIMES), LocalSampler(_RUNTIMES))
_client: TestClient | None = None


MODEL: dict = {}  # the fuzz key's session and training run


def started() -> TestClient:
    global _client
    if _client is None:
        _client = TestClient(APP, raise_server_exceptions=False)
        _client.__enter__()
        atexit.register(_client.__exit__, None, None, None)
        session = _client.post("/api/v1/create_session", json={"tags": []}, headers=KEY).json()["session_id"]
        fut = _client.post("/api/v1/create_model", headers=KEY, json={
            "session_id": session, "model_seq_id": 0, "base_model": "tiny", "lora_config": {"rank": 4}}).json()
        MODEL.update(session=session, model_id=fut["model_id"])
        result(fut["request_id"])
    return _client


def result(request_id: str) -> dict:
    while True:
        body = _client.post("/api/v1/retrieve_future", json={"request_id": request_id}, headers=KEY).json()
        if body.get("type") != "try_again":
            return body
