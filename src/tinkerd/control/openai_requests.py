"""OpenAI-compatible request bodies checked and turned into what the sampler needs.

`chat_request` and `completion_request` read the JSON body of `/chat/completions` and `/completions`
field by field and raise `OpenAIError` (400 naming the field in `param`) for anything this server
cannot do faithfully: a refused feature is an error, never silently ignored, while fields that
change nothing here (`user`, `metadata`, `store`, `service_tier`, `parallel_tool_calls`, ...) are
ignored as OpenAI-compatible servers do. docs/COMPATIBILITY.md lists each parameter's status.
Knows the wire format of OpenAI requests, not models, tokenizers or HTTP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_N = 128  # like the SDK route's num_samples limit
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat; /completions accepts the same here (OpenAI: 5)
MAX_STOP = 16  # OpenAI allows 4; more cost nothing here


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param=param, code=code)


@dataclass(frozen=True)
class Generation:
    """What a request asks of the sampler, checked. `max_tokens` None: the rest of the context (chat)."""

    model: str
    n: int
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    logprobs: bool
    top_logprobs: int
    stream: bool
    include_usage: bool
    echo: bool = False


@dataclass(frozen=True)
class ChatRequest:
    generation: Generation
    messages: list[dict]  # {role, content: str}, ready for the chat template


@dataclass(frozen=True)
class CompletionRequest:
    generation: Generation
    prompts: list[str | list[int]]  # text or token ids, one choice group each


# Parameters that would change the answer and that this server cannot honour: refused when set.
_REFUSED = {
    "tools": "tool calling is not supported", "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported", "function_call": "function calling is not supported",
    "audio": "audio output is not supported", "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported", "suffix": "suffix (insertion) is not supported",
}
_NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1}  # supported at these values only


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(name, f"expected a number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        raise invalid(name, f"must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"expected an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise invalid(name, f"must be in [{low}, {high}], got {value}" if high is not None
                      else f"must be >= {low}, got {value}")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(name, f"expected true or false, got {value!r}")
    return bool(value)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop", "expected a non-empty string or a list of non-empty strings")
    if len(stops) > MAX_STOP:
        raise invalid("stop", f"at most {MAX_STOP} stop sequences, got {len(stops)}")
    return tuple(stops)


def _refuse_unsupported(body: dict) -> None:
    for name, why in _REFUSED.items():
        if body.get(name) not in (None, [], {}, "none", ""):
            raise invalid(name, why)
    for name, neutral in _NEUTRAL.items():
        if body.get(name) not in (None, neutral):
            raise invalid(name, f"only the neutral value is supported, got {body.get(name)!r}")
    if body.get("logit_bias"):
        raise invalid("logit_bias", "logit bias is not supported")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise invalid("response_format", "only {'type': 'text'} is supported (no JSON mode or schemas)")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise invalid("modalities", "only ['text'] is supported")


def _generation(body: dict, max_tokens_default: int | None, echo: bool, logprobs: bool, top_logprobs: int) -> Generation:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "required: a base model name or a tinker:// checkpoint path (GET /models lists them)")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("stream_options", "expected an object")
    if options and not stream:
        raise invalid("stream_options", "only allowed with stream: true")
    include_usage = bool((options or {}).get("include_usage"))
    max_tokens = _integer(body, "max_completion_tokens", None, 1)
    max_tokens = _integer(body, "max_tokens", max_tokens_default, 1) if max_tokens is None else max_tokens
    best_of = _integer(body, "best_of", None, 1)
    n = _integer(body, "n", 1, 1, MAX_N)
    if best_of is not None and best_of != n:
        raise invalid("best_of", "only best_of == n is supported (every sample is returned)")
    return Generation(
        model=model, n=n, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_top_k(body), seed=_integer(body, "seed", None, -(2 ** 62), 2 ** 62),
        stop=_stop(body), logprobs=logprobs, top_logprobs=top_logprobs, stream=stream,
        include_usage=include_usage, echo=echo)


def _top_k(body: dict) -> int:
    """vLLM's extension: -1 or 0 = off."""
    top_k = _integer(body, "top_k", -1, -1)
    return -1 if top_k == 0 else top_k


def _message_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise invalid(where, "expected a string or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise invalid(f"{where}[{j}]", f"only text content parts are supported, got type {kind!r}")
        texts.append(part["text"])
    return "".join(texts)


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def chat_request(body: dict) -> ChatRequest:
    _refuse_unsupported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "required: a non-empty list of {role, content} messages")
    rendered = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{i}]", "expected an object with role and content")
        role = message.get("role")
        if role not in _ROLES:
            raise invalid(f"messages[{i}].role", f"expected one of {sorted(_ROLES)}, got {role!r}"
                          + (" (tool calling is not supported)" if role in ("tool", "function") else ""))
        if message.get("tool_calls"):
            raise invalid(f"messages[{i}].tool_calls", "tool calling is not supported")
        rendered.append({"role": _ROLES[role], "content": _message_text(message.get("content"), f"messages[{i}].content")})
    logprobs = _flag(body, "logprobs")
    top_logprobs = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if top_logprobs and not logprobs:
        raise invalid("top_logprobs", "needs logprobs: true")
    return ChatRequest(_generation(body, None, False, logprobs, top_logprobs), rendered)


def completion_request(body: dict) -> CompletionRequest:
    _refuse_unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _token_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _token_ids(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise invalid("prompt", "expected a string, a list of strings, a list of token ids or a list of such lists")
    if any(len(p) == 0 for p in prompts):
        raise invalid("prompt", "prompts must not be empty")
    top_logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top_logprobs is not None and _flag(body, "echo") and _flag(body, "stream"):
        raise invalid("echo", "echo with logprobs is supported without stream only (the prompt's logprobs come "
                              "with the result)")
    return CompletionRequest(_generation(body, 16, _flag(body, "echo"), top_logprobs is not None, top_logprobs or 0),
                             prompts)


def _token_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
