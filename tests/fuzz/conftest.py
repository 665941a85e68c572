"""The fuzz tier (`make test-fuzz`, run by .ci/run after `make test`; a plain `pytest` run leaves it out
unless TINKERD_FUZZ=1 or tests/fuzz is named): the app on a tiny random model, in-process, with the checks every
reply must pass. Bounded: a fixed number of derandomized examples per test, about two minutes in all."""

from __future__ import annotations

import os
import sys

from tinkerd.protocol.requests import __dict__ as _requests_module

KEY = {"X-API-Key": "tml-fuzz"}

# What an error may name: every field of every JSON body, the query/path parameters, and the body itself.
FIELD_NAMES = {name for obj in _requests_module.values() if isinstance(obj, type) and hasattr(obj, "model_fields")
               for name in obj.model_fields} | {
    "body", "prompt", "sampling_params", "data", "loss_fn_inputs", "model_input", "chunks", "tokens", "seq_id",
    "model_id", "session", "request_id", "offset", "limit", "access_scope", "tinker_path", "path", "run_id",
    "checkpoint", "sampler", "sampling_session_id", "ttl_seconds", "base_model", "adam_params", "loss_fn",
    "API key", "download", "kind", "name", "num_samples", "forward_backward_input", "target_tokens", "session_id",
    "training run", "public", "user_metadata", "lora_config", "method", "path", "parameter",
    "messages", "model", "prompt", "max_tokens", "n", "stop", "temperature", "logprobs", "stream", "content", "role",
    "file", "file_id", "purpose", "after", "order", "data_file", "training_file", "grader", "budget", "hyperparameters"}


def check_reply(response) -> None:
    """No 5xx; every 4xx is JSON with a `detail` (the OpenAI routes: `error.message`) naming what was wrong."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/json"), response.headers
        body = response.json()
        detail = body["detail"] if "detail" in body else body["error"]["message"]  # the OpenAI routes' shape
        assert detail, response.text
        assert any(name in str(detail) for name in FIELD_NAMES), f"the error names no field: {detail!r}"


# A plain `pytest` (make test) leaves the tier out, without even importing it.
if os.environ.get("TINKERD_FUZZ") != "1" and not any("fuzz" in arg for arg in sys.argv[1:]):
    collect_ignore_glob = ["test_*.py"]
