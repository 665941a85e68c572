"""Start a `tinkerd serve` subprocess on a free loopback port and wait until it answers.

Used by the end-to-end tests and the benchmarks (and handy in notebooks). Knows nothing about
what the server does; it only starts, checks and stops the process.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    def __init__(self, data_dir: Path, *extra_args: str, model_cache: Path | None = None,
                 startup_timeout: float = 300.0, park_on_exit: bool = False, port: int | None = None,
                 own_session: bool = False) -> None:
        """`park_on_exit`: keep unsaved training state across `stop()` (off: a throwaway server writes none).
        `own_session`: out of the terminal's process group, so a Ctrl-C reaches only the caller, who may still
        need the server (`tinkerd tune` cancels its job with it)."""
        self.port = port or free_port()
        self.park_on_exit = park_on_exit
        self.url = f"http://127.0.0.1:{self.port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / "server.log"
        self._log = open(self.log_path, "w")
        cache = ["--model-cache", str(model_cache)] if model_cache is not None else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tinkerd.cli", "serve", "--port", str(self.port), "--data-dir", str(data_dir),
             *cache, *([] if park_on_exit else ["--shutdown-park-seconds", "0"]), *extra_args],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=own_session,
        )
        deadline = time.time() + startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tinkerd exited early:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(f"{self.url}/api/v1/healthz", timeout=2)
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"tinkerd did not become healthy:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text()[-chars:]

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: uvicorn's graceful shutdown (and parking, if on)
            try:
                self.proc.wait(timeout=330 if self.park_on_exit else 30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
