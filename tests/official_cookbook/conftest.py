"""Fixtures for running the official tinker-cookbook 0.6.1 recipes, unmodified, against a real tinkerd.

The server gets its own empty HF_HOME: tinkerd publishes the embedded model's tokenizer there under
its hub name on start, which is how the recipes (which load the tokenizer by hub name) find it
offline. The recipes themselves run as subprocesses (see harness.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.e2e.conftest import ServerProcess
from tests.official_cookbook.harness import API_KEY, CookbookServer


@pytest.fixture(scope="session")
def cookbook_server(tmp_path_factory):
    if importlib.util.find_spec("tinker_cookbook") is None:
        pytest.fail("tinker-cookbook is not installed: run `make setup` (it installs tinker-cookbook==0.6.1 --no-deps)")
    hf_home = tmp_path_factory.mktemp("hf-home")
    with pytest.MonkeyPatch.context() as mp:  # the server subprocess inherits the environment
        mp.setenv("HF_HOME", str(hf_home))
        mp.delenv("HF_HUB_CACHE", raising=False)
        proc = ServerProcess(tmp_path_factory.mktemp("tinkerd-official-cookbook"))
    yield CookbookServer(proc.url, hf_home, proc.log_path)
    proc.stop()


@pytest.fixture(scope="session")
def rest(cookbook_server):
    import tinker

    return tinker.RestClient(base_url=cookbook_server.url, api_key=API_KEY)


@pytest.fixture(scope="session")
def example_conversations() -> Path:
    """The cookbook's bundled example_data/conversations.jsonl (128 short chats)."""
    spec = importlib.util.find_spec("tinker_cookbook")
    return Path(spec.origin).parent / "example_data" / "conversations.jsonl"
