"""A real `tinkerd serve` subprocess on the embedded model, on a free loopback port.

The converted model is cached in `.tinkerd/test-models` (override with TINKERD_TEST_MODEL_CACHE),
so only the first run on a machine pays the ~20 s GGUF conversion.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL_CACHE = Path(os.environ.get("TINKERD_TEST_MODEL_CACHE", REPO / ".tinkerd" / "test-models"))
EMBEDDED = "HuggingFaceTB/SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "server.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tinkerd.cli", "serve", "--port", str(self.port), "--data-dir", str(data_dir),
             "--model-cache", str(MODEL_CACHE), *extra],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tinkerd exited early:\n{self.log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/api/v1/healthz", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"tinkerd did not become healthy:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("tinkerd-data"))
    yield proc
    proc.stop()
