"""Engine sampling requests as vLLM `/v1/completions` bodies, and vLLM's answers as `SampleResult`s.

Pure functions, no I/O. Prompts go as token ids; the sampled tokens come back as ids
(`return_token_ids`, with `return_tokens_as_token_ids` on the logprobs as a fallback for older
servers) with the logprob of every sampled token (`logprobs`: 0, or k for top-k). Logprobs are
vLLM's default `raw_logprobs` mode: the model's own distribution before temperature, top-k and
top-p, the same quantity the embedded sampler and the trainer's `forward` report.

Seeds: sample i of a seeded request draws with seed `seed + i`, as in the embedded sampler, so a
seeded request with n samples becomes n one-sample bodies (vLLM's prefix cache shares their
prompt); an unseeded one is a single body with `n`.

Knows the vLLM wire fields (see vllm/entrypoints/openai/completion/protocol.py) and nothing about
HTTP, retries or adapters. Fields vLLM cannot answer (`prompt_logprobs_last_n`,
`target_prompt_logprobs`, `prompt_alt_tokens_k`) are refused as user errors naming the field.
"""

from __future__ import annotations

import math

import numpy as np

from tinkerd.engine.interface import SampleTask
from tinkerd.protocol.types import TOPK_SENTINEL_LOGPROB, BadRequest, SampledSequence, SampleResult

TOKEN_ID_PREFIX = "token_id:"


def check_supported(request: SampleTask) -> None:
    """User errors for what the vLLM sampler cannot do, before anything is sent."""
    unsupported = {
        "prompt_logprobs_last_n": request.prompt_logprobs_last_n is not None,
        "target_prompt_logprobs": request.target_prompt_logprobs is not None,
        "prompt_alt_tokens_k": request.prompt_alt_tokens_k > 0,
    }
    for field, asked in unsupported.items():
        if asked:
            raise BadRequest(f"{field} is not supported by this server's vLLM sampler (tinkerd serve --sampler vllm); "
                             "the embedded sampler (--sampler local) supports it")
    if not request.prompt:
        raise BadRequest("prompt: at least one token is required")
    if request.num_samples < 1:
        raise BadRequest(f"num_samples must be >= 1, got {request.num_samples}")
    if request.topk_prompt_logprobs < 0 or request.topk_sample_logprobs < 0:
        raise BadRequest("topk_prompt_logprobs and topk_sample_logprobs must be >= 0")


def completion_bodies(request: SampleTask, model: str) -> list[dict]:
    """The `/v1/completions` bodies whose choices, in order, are the request's samples."""
    params = request.params
    body: dict = {
        "model": model,
        "prompt": list(request.prompt),
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "logprobs": request.topk_sample_logprobs,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
        "ignore_eos": not params.stop_at_eos,
        "stop_token_ids": list(params.stop_tokens),
        "stop": list(params.stop_strings),
        "include_stop_str_in_output": True,  # the embedded sampler returns the stop string's tokens too
        "skip_special_tokens": False,
    }
    if params.top_k > 0:
        body["top_k"] = params.top_k
    if request.prompt_logprobs or request.topk_prompt_logprobs > 0:
        body["prompt_logprobs"] = request.topk_prompt_logprobs
    if params.seed is None:
        return [{**body, "n": request.num_samples}]
    return [{**body, "n": 1, "seed": params.seed + i} for i in range(request.num_samples)]


def _token_id(token: str | int) -> int:
    if isinstance(token, int):
        return token
    if token.startswith(TOKEN_ID_PREFIX):
        return int(token[len(TOKEN_ID_PREFIX):])
    raise ValueError(f"vLLM returned token {token!r} without its id (is return_tokens_as_token_ids supported?)")


def _topk_rows(rows: list[dict | None], k: int, key, value) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, logprobs float32), both (len(rows), k): each row's k best {token: entry} items, best
    first; a missing row (or missing entries) keeps ids 0 and the sentinel logprob."""
    ids = np.zeros((len(rows), k), dtype=np.int32)
    values = np.full((len(rows), k), TOPK_SENTINEL_LOGPROB, dtype=np.float32)
    for t, entries in enumerate(rows):
        ranked = sorted(((key(tok), value(v)) for tok, v in (entries or {}).items()), key=lambda item: -item[1])[:k]
        ids[t, :len(ranked)] = [tok for tok, _ in ranked]
        values[t, :len(ranked)] = [lp for _, lp in ranked]
    return ids, values


def parse_choice(choice: dict, request: SampleTask) -> SampledSequence:
    logprobs = choice.get("logprobs") or {}
    tokens = choice.get("token_ids")
    if tokens is None:
        tokens = [_token_id(t) for t in logprobs.get("tokens", [])]
    token_lp = logprobs.get("token_logprobs")
    if token_lp is None or len(token_lp) != len(tokens):
        raise ValueError(f"vLLM returned {len(tokens)} tokens but logprobs for {len(token_lp or [])}")
    reason = choice.get("finish_reason")
    if reason not in ("stop", "length"):
        raise ValueError(f"vLLM finished a sample with finish_reason {reason!r}")
    topk = None
    if request.topk_sample_logprobs > 0:
        rows = logprobs.get("top_logprobs") or []
        if len(rows) != len(tokens):
            raise ValueError(f"vLLM returned top logprobs for {len(rows)} of {len(tokens)} tokens")
        topk = _topk_rows(rows, request.topk_sample_logprobs, _token_id, float)
    return SampledSequence([int(t) for t in tokens], [float(x) for x in token_lp], reason, topk)


def parse_prompt_logprobs(result: SampleResult, positions: list, request: SampleTask) -> None:
    """vLLM's `prompt_logprobs` (None, then one {token id: {logprob, rank, ...}} per position) into
    the result's prompt logprobs (NaN at position 0) and top-k rows (sentinel at position 0)."""
    n = len(request.prompt)
    if len(positions) != n:
        raise ValueError(f"vLLM returned prompt logprobs for {len(positions)} of {n} prompt positions")
    if request.prompt_logprobs:
        scores = [math.nan]
        for t in range(1, n):
            entry = (positions[t] or {}).get(str(request.prompt[t]))
            if entry is None:
                raise ValueError(f"vLLM's prompt logprobs lack prompt token {request.prompt[t]} at position {t}")
            scores.append(float(entry["logprob"]))
        result.prompt_logprobs = scores
    if request.topk_prompt_logprobs > 0:  # keys are token ids; position 0 (None) keeps the sentinel row
        result.topk_prompt_logprobs = _topk_rows(positions, request.topk_prompt_logprobs, int,
                                                 lambda entry: float(entry["logprob"]))


def build_result(responses: list[dict], request: SampleTask) -> SampleResult:
    """One `SampleResult` from the answers to `completion_bodies(request, ...)`, in the same order."""
    choices = [c for response in responses for c in sorted(response.get("choices", []), key=lambda c: c["index"])]
    if len(choices) != request.num_samples:
        raise ValueError(f"vLLM returned {len(choices)} samples, {request.num_samples} were asked")
    result = SampleResult(sequences=[parse_choice(c, request) for c in choices])
    if request.prompt_logprobs or request.topk_prompt_logprobs > 0:
        positions = choices[0].get("prompt_logprobs")
        if positions is None:
            raise ValueError("vLLM returned no prompt_logprobs")
        parse_prompt_logprobs(result, positions, request)
    return result
