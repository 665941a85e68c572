"""Running official tinker-cookbook recipes as subprocesses against a tinkerd, and reading their logs.

`CookbookServer.env()` is the environment of one recipe process: the server's URL, an API key with
the `tml-` prefix the SDK insists on, the server's HF_HOME (where tinkerd published the tokenizer
under its hub name) with every hub client offline, and an HTTPS proxy on a dead loopback port so
that nothing (the cookbook's pricing fetch, say) leaves the machine.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import EMBEDDED

API_KEY = "tml-official-cookbook-test"
RENDERER = "qwen3_instruct"  # the cookbook renderer whose tokens match SmolLM2's ChatML template


@dataclass
class CookbookServer:
    url: str
    hf_home: Path
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text()[-chars:]

    def failures(self) -> list[str]:
        """Server log lines of 5xx answers and tracebacks: none may happen while a recipe runs."""
        return [line for line in self.log_path.read_text().splitlines()
                if "Traceback" in line or re.search(r"tinkerd\.http: [A-Z]+ \S+ 5\d\d ", line)]

    def env(self) -> dict[str, str]:
        """The environment of one recipe process: our server, offline hub, nothing leaves loopback."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TINKER_", "HF_"))}
        env.update(
            TINKER_BASE_URL=self.url, TINKER_API_KEY=API_KEY, TINKER_TELEMETRY="0",
            HF_HOME=str(self.hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
            HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="127.0.0.1,localhost", PYTHONUNBUFFERED="1",
        )
        env.pop("HTTP_PROXY", None)  # the SDK's transport would honour it for the server's http:// URL
        return env


class Recipe:
    """One recipe module run as a subprocess against the cookbook server, logging under `log_path`."""

    def __init__(self, server: CookbookServer, module: str, log_path: Path, *args: str) -> None:
        self.server, self.module, self.log_path, self.args = server, module, log_path, list(args)
        self.runs = 0

    def _command(self, overrides: tuple[str, ...], resume: bool) -> list[str]:
        behavior = "resume" if resume else "delete"
        return [sys.executable, "-m", self.module, f"model_name={EMBEDDED}", f"renderer_name={RENDERER}", *self.args,
                *overrides, f"log_path={self.log_path}", f"behavior_if_log_dir_exists={behavior}"]

    def _output(self) -> Path:
        self.runs += 1
        return self.log_path.parent / f"{self.log_path.name}.run{self.runs}.out"

    def run(self, *overrides: str, resume: bool = False, timeout: float = 300) -> str:
        """Run to completion; returns the recipe's output and fails the test on a non-zero exit."""
        out_path = self._output()
        started = time.monotonic()
        with open(out_path, "w") as out:
            try:
                rc = subprocess.run(self._command(overrides, resume), env=self.server.env(), stdout=out,
                                    stderr=subprocess.STDOUT, cwd=self.log_path.parent, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                pytest.fail(f"{self.module} did not finish in {timeout} s:\n{_tail(out_path)}\n"
                            f"--- server ---\n{self.server.log_tail()}")
        output = out_path.read_text()
        assert rc == 0, f"{self.module} exited {rc}:\n{_tail(out_path)}\n--- server ---\n{self.server.log_tail()}"
        assert not self.server.failures(), self.server.failures()
        print(f"{self.module} {' '.join(overrides)}: {time.monotonic() - started:.1f} s")
        return output

    def run_until_checkpoint(self, batch: int, *overrides: str, timeout: float = 300) -> str:
        """Start a long run and SIGKILL it once it has recorded a resumable checkpoint at `batch`: a crash."""
        out_path = self._output()
        started = time.monotonic()
        deadline = started + timeout
        with open(out_path, "w") as out:
            proc = subprocess.Popen(self._command(overrides, False), env=self.server.env(), stdout=out,
                                    stderr=subprocess.STDOUT, cwd=self.log_path.parent)
            try:
                while not any(r.get("batch") == batch and "state_path" in r for r in self.checkpoints()):
                    assert proc.poll() is None, f"{self.module} ended before its checkpoint:\n{_tail(out_path)}"
                    if time.monotonic() > deadline:
                        pytest.fail(f"no checkpoint at batch {batch} within {timeout} s:\n{_tail(out_path)}")
                    time.sleep(0.1)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
        print(f"{self.module} {' '.join(overrides)}: killed after its batch-{batch} checkpoint, "
              f"{time.monotonic() - started:.1f} s")
        return out_path.read_text()

    def checkpoints(self) -> list[dict]:
        return _read_jsonl(self.log_path / "checkpoints.jsonl")

    def metrics(self) -> list[dict]:
        return _read_jsonl(self.log_path / "metrics.jsonl")

    def step_rows(self, key: str) -> list[dict]:
        """The metrics rows of training steps (those that carry `key`), checked to be finite."""
        rows = [row for row in self.metrics() if key in row]
        for row in rows:
            for name, value in row.items():
                if isinstance(value, float):
                    assert math.isfinite(value), (self.module, name, row)
        return rows


def _read_jsonl(path: Path) -> list[dict]:
    """The complete JSON lines of a file the recipe may still be writing (or a killed one left half-written)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text()[-chars:]
