"""A real `tinkerd serve` subprocess on the embedded model, on a free loopback port.

The converted model is cached in `.tinkerd/test-models` (override with TINKERD_TEST_MODEL_CACHE),
so only the first run on a machine pays the ~20 s GGUF conversion.
"""

from __future__ import annotations

import gc
import os
import sys
import urllib.request
from pathlib import Path

import pytest
from tinker import types

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


def sft_datum(tokenizer, question: str, answer: str) -> types.Datum:
    """One chat SFT example: the answer's tokens weigh 1, the prompt's 0."""
    msgs = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=True,
                                         return_dict=False)
    weights = [0.0] * (len(prompt) - 1) + [1.0] * (len(full) - len(prompt))
    return types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                       loss_fn_inputs={"target_tokens": full[1:], "weights": weights})


def open_sdk_sessions() -> list:
    """The SDK's session holders whose heartbeat still runs. A ServiceClient that is never closed keeps
    heartbeating until the process exits (its heartbeat task holds it), whatever became of its server."""
    module = sys.modules.get("tinker.lib.internal_client_holder")
    if module is None:
        return []
    holder = module.InternalClientHolder  # `type(...) is`: isinstance on every object is 10x slower (0.15 s here)
    return [obj for obj in gc.get_objects() if type(obj) is holder and not getattr(obj, "_closed", True)
            and getattr(obj, "_session_heartbeat_task", None) is not None and not obj._session_heartbeat_task.done()]


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/api/v1/healthz", timeout=5)
        return True
    except OSError:
        return False


@pytest.fixture(autouse=True)
def no_sdk_session_outlives_its_server():
    """After each test: no SDK session it opened still heartbeats to a server that is gone (close the
    ServiceClient, e.g. `with tinker.ServiceClient(...) as service:`, before stopping its server). Sessions
    opened before the test (by tests elsewhere) are not its to answer for."""
    before = {id(h) for h in open_sdk_sessions()}
    yield
    orphans = [h for h in open_sdk_sessions() if id(h) not in before and not _answers(h._base_url)]
    assert not orphans, f"SDK sessions left heartbeating to stopped servers: {sorted(h._base_url for h in orphans)}"
