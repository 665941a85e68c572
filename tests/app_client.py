"""The in-process app on a tiny random model (`api`, a fixture the root conftest offers), and a helper that
waits for a future's result. Used by the tests of server/, control/, store/ and the Ray tier."""

from fastapi.testclient import TestClient

from tinkerd.engine.sampler import LocalSampler
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.server.app import create_app
from tinkerd.control.plane import ServerConfig
from tests.conftest import make_tiny_runtime

OWNER_KEY = {"X-API-Key": "tml-owner"}


def future_result(client, request_id, headers=OWNER_KEY):
    while True:
        body = client.post("/api/v1/retrieve_future", json={"request_id": request_id}, headers=headers).json()
        if body.get("type") != "try_again":
            return body


def app_client(tmp_path, **config):
    """`config`: more `ServerConfig` fields (limits, ...)."""
    runtimes = {"tiny": make_tiny_runtime()}
    app = create_app(ServerConfig(data_dir=tmp_path, long_poll_seconds=5, **config), LocalTrainer(runtimes),
                     LocalSampler(runtimes))
    with TestClient(app) as client:
        client.st = app.state.tinkerd
        yield client
