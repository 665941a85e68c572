"""The app on a tiny random model behind a real HTTP port (uvicorn in a thread), for tests that drive it with the
official SDK yet need the engine's internals (gradients) in the same process."""

from __future__ import annotations

import contextlib
import threading
import time

import uvicorn

from tinkerd.control.plane import ServerConfig
from tinkerd.engine.sampler import LocalSampler
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.local_server import free_port
from tinkerd.server.app import create_app
from tests.conftest import make_tiny_runtime


@contextlib.contextmanager
def inprocess_server(data_dir, **config):
    """Yields (url, trainer); the server stops when the block ends."""
    runtimes = {"tiny": make_tiny_runtime()}
    trainer = LocalTrainer(runtimes)
    app = create_app(ServerConfig(data_dir=data_dir, long_poll_seconds=5, **config), trainer, LocalSampler(runtimes))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the in-process server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", trainer
    finally:
        server.should_exit = True
        thread.join(timeout=30)
