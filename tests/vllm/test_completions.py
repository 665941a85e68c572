"""Reading vLLM answers shaped as vLLM writes them, where the fake does not go: no `token_ids`
(older servers), top-k dicts that also hold the sampled token (k + 1 entries), bad answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tinkerd.engine.interface import AdapterRef, SampleTask
from tinkerd.protocol.types import TOPK_SENTINEL_LOGPROB, BadRequest, SamplingParams
from tinkerd.backends.vllm_completions import build_result, check_supported, completion_bodies


def _request(**kwargs) -> SampleTask:
    return SampleTask("r", AdapterRef(None, "m"), [1, 2, 3], 1, SamplingParams(max_tokens=2), **kwargs)


def test_ids_from_logprob_tokens_and_topk_without_the_extra_sampled_entry():
    choice = {"index": 0, "finish_reason": "length", "logprobs": {
        "tokens": ["token_id:7", "token_id:4"], "token_logprobs": [-0.5, -3.0],
        "top_logprobs": [{"token_id:7": -0.5, "token_id:8": -1.5},
                         {"token_id:9": -0.1, "token_id:5": -2.5, "token_id:4": -3.0}]}}  # 4: sampled, not top-2
    prompt = [None, {"2": {"logprob": -1.0, "rank": 3}, "6": {"logprob": -0.2, "rank": 1}, "0": {"logprob": -0.9}},
              {"3": {"logprob": -0.3, "rank": 1}, "5": {"logprob": -2.0, "rank": 2}}]
    result = build_result([{"choices": [{**choice, "prompt_logprobs": prompt}]}],
                          _request(topk_sample_logprobs=2, prompt_logprobs=True, topk_prompt_logprobs=2))
    seq = result.sequences[0]
    assert seq.tokens == [7, 4] and seq.logprobs == [-0.5, -3.0] and seq.stop_reason == "length"
    np.testing.assert_array_equal(seq.topk_logprobs[0], [[7, 8], [9, 5]])
    assert math.isnan(result.prompt_logprobs[0]) and result.prompt_logprobs[1:] == [-1.0, -0.3]
    np.testing.assert_array_equal(result.topk_prompt_logprobs[0], [[0, 0], [6, 0], [3, 5]])
    assert result.topk_prompt_logprobs[1][0, 0] == TOPK_SENTINEL_LOGPROB


def test_answers_that_do_not_fit_the_request_are_errors():
    ok = {"index": 0, "finish_reason": "stop", "token_ids": [5], "logprobs": {"token_logprobs": [-1.0]}}
    with pytest.raises(ValueError, match="1 samples, 2 were asked"):
        build_result([{"choices": [ok]}], SampleTask("r", AdapterRef(None, "m"), [1], 2, SamplingParams()))
    with pytest.raises(ValueError, match="finish_reason 'abort'"):
        build_result([{"choices": [{**ok, "finish_reason": "abort"}]}], _request())
    with pytest.raises(ValueError, match="without its id"):
        build_result([{"choices": [{"index": 0, "finish_reason": "stop", "logprobs": {
            "tokens": ["5"], "token_logprobs": [-1.0]}}]}], _request())


def test_seeded_requests_split_per_sample_and_unsupported_fields_are_named():
    request = SampleTask("r", AdapterRef(None, "m"), [1, 2], 3, SamplingParams(seed=5, top_k=-1))
    bodies = completion_bodies(request, "m@2")
    assert [(b["n"], b["seed"]) for b in bodies] == [(1, 5), (1, 6), (1, 7)]
    assert "top_k" not in bodies[0] and "prompt_logprobs" not in bodies[0] and bodies[0]["model"] == "m@2"
    with pytest.raises(BadRequest, match="target_prompt_logprobs"):
        check_supported(_request(target_prompt_logprobs=np.zeros((2, 1), np.int64)))
    with pytest.raises(BadRequest, match="prompt_logprobs_last_n"):
        check_supported(_request(prompt_logprobs=True, prompt_logprobs_last_n=1))
