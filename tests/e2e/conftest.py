"""A real `tinkerd serve` subprocess on the embedded model, on a free loopback port.

The converted model is cached in `.tinkerd/test-models` (override with TINKERD_TEST_MODEL_CACHE),
so only the first run on a machine pays the ~20 s GGUF conversion.
"""

from __future__ import annotations

import os
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
