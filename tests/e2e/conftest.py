"""A real `tinkerd serve` subprocess on the embedded model, on a free loopback port.

The converted model is cached in `.tinkerd/test-models` (override with TINKERD_TEST_MODEL_CACHE),
so only the first run on a machine pays the ~20 s GGUF conversion.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tinkerd.local_server import LocalServer

REPO = Path(__file__).resolve().parents[2]
MODEL_CACHE = Path(os.environ.get("TINKERD_TEST_MODEL_CACHE", REPO / ".tinkerd" / "test-models"))
EMBEDDED = "HuggingFaceTB/SmolLM2-135M-Instruct"


def ServerProcess(data_dir: Path, *extra: str, **options) -> LocalServer:
    return LocalServer(data_dir, *extra, model_cache=MODEL_CACHE, **options)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("tinkerd-data"))
    yield proc
    proc.stop()
