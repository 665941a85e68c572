"""Sampling on the wire: decode the JSON `asample` request, encode the protobuf `SampleResponse`."""

from __future__ import annotations

import numpy as np

from tinkerd.protocol.numbers import INT32_MAX, as_float, as_int, int_list
from tinkerd.protocol.tensors import tensor_to_pb
from tinkerd.protocol.types import SEED_MAX, SEED_MIN, TOPK_SENTINEL_LOGPROB, BadRequest, SampleResult, SamplingParams
from tinkerd.protocol.wire_pb import pb


def prompt_tokens(prompt: dict) -> list[int]:
    if not isinstance(prompt, dict) or not isinstance(prompt.get("chunks"), list):
        raise BadRequest("prompt: expected a ModelInput object with a 'chunks' list")
    tokens: list[int] = []
    for j, chunk in enumerate(prompt["chunks"]):
        if not isinstance(chunk, dict) or chunk.get("type", "encoded_text") != "encoded_text":
            raise BadRequest(f"prompt.chunks[{j}]: only encoded_text chunks are supported by this server")
        tokens += int_list(chunk.get("tokens"), f"prompt.chunks[{j}].tokens", 0, INT32_MAX)
    return tokens


def sampling_params(obj: dict | None) -> SamplingParams:
    """The JSON `sampling_params`, every number range-checked (`protocol.numbers`); context length and
    vocabulary are the engine's to check."""
    if obj is None:
        obj = {}
    if not isinstance(obj, dict):
        raise BadRequest("sampling_params: expected an object")
    stop = obj.get("stop")
    stop_strings: tuple[str, ...] = ()
    stop_tokens: tuple[int, ...] = ()
    if isinstance(stop, str):
        stop_strings = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop_strings = tuple(stop)
    elif isinstance(stop, list):
        stop_tokens = tuple(int_list(stop, "sampling_params.stop", 0, INT32_MAX))
    elif stop is not None:
        raise BadRequest("sampling_params.stop: expected null, a string, a list of strings or a list of token ids")

    def number(name, parse, default, *bounds, **kw):
        value = obj.get(name)
        return default if value is None else parse(value, f"sampling_params.{name}", *bounds, **kw)

    return SamplingParams(
        max_tokens=number("max_tokens", as_int, 16, 1, INT32_MAX),
        temperature=number("temperature", as_float, 1.0, 0.0, None),
        top_k=number("top_k", as_int, -1, -1, INT32_MAX),
        top_p=number("top_p", as_float, 1.0, 0.0, 1.0, lo_open=True),
        seed=number("seed", as_int, None, SEED_MIN, SEED_MAX),
        stop_strings=stop_strings,
        stop_tokens=stop_tokens,
        stop_at_eos=stop != [],
    )


MAX_SAMPLES_PER_REQUEST = 128
MAX_PROMPT_ALT_TOKENS = 1024


def check_counts(request, max_topk: int) -> None:
    """The counts of a `SampleRequest`: num_samples, top-k sizes (at most `max_topk`, the server's
    `--max-topk-logprobs`: their cost is positions x k), prompt_alt_tokens_k, prompt_logprobs_last_n."""
    as_int(request.num_samples, "num_samples", 1, MAX_SAMPLES_PER_REQUEST)
    as_int(request.topk_prompt_logprobs, "topk_prompt_logprobs", 0, max_topk)
    as_int(request.topk_sample_logprobs, "topk_sample_logprobs", 0, max_topk)
    as_int(request.prompt_alt_tokens_k, "prompt_alt_tokens_k", 0, MAX_PROMPT_ALT_TOKENS)
    if request.prompt_logprobs_last_n is not None:
        as_int(request.prompt_logprobs_last_n, "prompt_logprobs_last_n", 1, INT32_MAX)


def _topk_to_pb(topk: tuple[np.ndarray, np.ndarray], out) -> None:
    ids, logprobs = topk
    out.token_ids = np.ascontiguousarray(ids, dtype="<i4").tobytes()
    out.logprobs = np.ascontiguousarray(logprobs, dtype="<f4").tobytes()
    out.k = ids.shape[1]
    out.length = ids.shape[0]


def encode_sample_pb(result: SampleResult, target_layout: tuple[np.ndarray, np.ndarray] | None = None) -> bytes:
    """`target_layout`: the CSR indices of a sparse `target_prompt_logprobs` request, answered alike."""
    msg = pb.SampleResponse()
    for seq in result.sequences:
        out = msg.sequences.add()
        out.stop_reason = pb.STOP_REASON_STOP if seq.stop_reason == "stop" else pb.STOP_REASON_LENGTH
        out.tokens = np.asarray(seq.tokens, dtype="<i4").tobytes()
        out.logprobs = np.asarray(seq.logprobs, dtype="<f4").tobytes()
        if seq.topk_logprobs is not None:
            _topk_to_pb(seq.topk_logprobs, out.topk_sampled_logprobs)
    if result.prompt_logprobs is not None:
        msg.prompt_logprobs = np.asarray(result.prompt_logprobs, dtype="<f4").tobytes()
    if result.topk_prompt_logprobs is not None:
        _topk_to_pb(result.topk_prompt_logprobs, msg.topk_prompt_logprobs)
    if result.target_prompt_logprobs is not None:
        tensor_to_pb(result.target_prompt_logprobs, msg.target_prompt_logprobs, target_layout)
    if result.prompt_alt_tokens is not None:
        tensor_to_pb(result.prompt_alt_tokens[0], msg.prompt_alt_tokens.tokens)
        tensor_to_pb(result.prompt_alt_tokens[1], msg.prompt_alt_tokens.logprobs)
    return msg.SerializeToString()


def sample_to_json(result: SampleResult) -> dict:
    """The JSON form older SDKs read (NaN becomes null)."""
    prompt = None
    if result.prompt_logprobs is not None:
        prompt = [None if lp != lp else lp for lp in result.prompt_logprobs]
    return {
        "type": "sample",
        "sequences": [{"tokens": s.tokens, "logprobs": s.logprobs, "stop_reason": s.stop_reason}
                      for s in result.sequences],
        "prompt_logprobs": prompt,
        "topk_prompt_logprobs": None if result.topk_prompt_logprobs is None else [
            None if lps[0] == TOPK_SENTINEL_LOGPROB else list(zip(ids.tolist(), lps.tolist()))
            for i, (ids, lps) in enumerate(zip(*result.topk_prompt_logprobs))],
    }
