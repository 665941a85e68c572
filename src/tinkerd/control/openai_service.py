"""OpenAI-compatible chat and text completions on the same sampler queue as the SDK's `asample`.

`chat_completion` and `text_completion` check the request (`openai_requests`), resolve its `model`
to the adapter that answers it (`openai_models`), render the messages with the base model's own chat
template (`chat_tokenizer`), and submit one `SampleTask` per prompt to the scheduler with a
`SampleChannel` (`Scheduler.submit_sample`): the rows join the running continuous batch with the SDK's,
mixed adapters in one decode step. They return the response body, or for `stream: true` the
server-sent events (`chat.completion.chunk` / `text_completion` chunks, then `[DONE]`).

Streaming: on a `StreamingSampler` (the embedded one) each decode step's tokens become a chunk; a
sampler that only reports finished requests (Ray, vLLM) streams the whole answer as one chunk at the
end. A client that goes away (the stream is closed, or a non-streaming request's connection drops)
cancels its rows, which stop decoding at the next step. Knows no HTTP: the route hands in a
`client_gone()` coroutine (it returns when the client has closed the connection) and writes what comes back.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from tinkerd.control import curves
from tinkerd.control.chat_tokenizer import ChatTokenizer, TemplateError
from tinkerd.control.openai_models import resolve_model
from tinkerd.control.openai_render import (ChoiceText, Delta, chat_logprobs, completion_logprobs, prompt_scores,
                                           usage)
from tinkerd.control.openai_requests import Generation, OpenAIError, chat_request, completion_request, invalid
from tinkerd.control.plane import ControlPlane
from tinkerd.control.sample_channel import LOST, USER, SampleChannel, SampleEvent
from tinkerd.engine.interface import AdapterRef, BaseModelInfo, SampleTask, snapshot_run
from tinkerd.protocol.paths import PREFIX
from tinkerd.protocol.types import BadRequest, SampleResult, SamplingParams

ClientGone = Callable[[], Awaitable[None]]  # returns once the client has closed its connection
RETRY_AFTER_SECONDS = 1


@dataclass
class Reply:
    """One request in flight: its tasks, and one `ChoiceText` per choice (index = prompt * n + sample)."""

    st: ControlPlane
    chat: bool
    generation: Generation
    tokenizer: ChatTokenizer
    tasks: list[SampleTask]
    id: str
    created: int = field(default_factory=lambda: int(time.time()))
    choices: dict[tuple[str, int], tuple[int, ChoiceText]] = field(default_factory=dict)
    results: dict[str, SampleResult] = field(default_factory=dict)
    texts: dict[int, str] = field(default_factory=dict)  # choice index -> text so far
    entries: dict[int, list] = field(default_factory=dict)  # choice index -> logprob entries so far
    owner: str = ""  # who asked: each finished request is recorded on its run's curves (`control.curves`)
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        n, stop, top = self.generation.n, self.generation.stop, self.generation.top_logprobs
        for k, task in enumerate(self.tasks):
            for j in range(n):
                self.choices[(task.request_id, j)] = (k * n + j, ChoiceText(self.tokenizer, stop, top))
                self.texts[k * n + j], self.entries[k * n + j] = "", []

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.tasks)

    def cancel_unfinished(self, reason: str) -> None:
        for task in self.tasks:
            if task.request_id not in self.results:
                self.st.scheduler.cancel_sample(task.request_id, reason)

    def usage(self) -> dict:
        return usage(sum(len(t.prompt) for t in self.tasks),
                     sum(choice.generated for _, choice in self.choices.values()))


async def chat_completion(st: ControlPlane, owner: str, body: dict, client_gone: ClientGone) -> dict | AsyncIterator[str]:
    request = chat_request(body)
    ref, info = resolve_model(st, owner, request.generation.model)
    tokenizer = await _tokenizer(st, info)
    try:
        prompt = tokenizer.encode(tokenizer.render(request.messages))
    except TemplateError as exc:
        raise invalid("messages", f"the chat template of {info.name!r} refused them: {exc}") from None
    reply = Reply(st, True, request.generation, tokenizer, [_task(request.generation, ref, info, prompt, "messages")],
                  f"chatcmpl-{uuid.uuid4().hex}", owner=owner)
    return await _answer(reply, client_gone)


async def text_completion(st: ControlPlane, owner: str, body: dict, client_gone: ClientGone) -> dict | AsyncIterator[str]:
    request = completion_request(body)
    ref, info = resolve_model(st, owner, request.generation.model)
    tokenizer = await _tokenizer(st, info)
    prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in request.prompts]
    tasks = [_task(request.generation, ref, info, prompt, "prompt") for prompt in prompts]
    reply = Reply(st, False, request.generation, tokenizer, tasks, f"cmpl-{uuid.uuid4().hex}", owner=owner)
    return await _answer(reply, client_gone)


async def _tokenizer(st: ControlPlane, info: BaseModelInfo) -> ChatTokenizer:
    try:
        return await asyncio.to_thread(st.tokenizers.get, info.tokenizer_id)  # the first load reads files
    except BadRequest as exc:
        raise OpenAIError(400, str(exc), param="model", code="tokenizer_unavailable") from None


def _task(gen: Generation, ref: AdapterRef, info: BaseModelInfo, prompt: list[int], prompt_field: str) -> SampleTask:
    room = info.max_context_length - len(prompt)
    if room < 1:
        raise invalid(prompt_field, f"{len(prompt)} prompt tokens leave no room in the model's context of "
                                    f"{info.max_context_length} tokens", code="context_length_exceeded")
    max_tokens = room if gen.max_tokens is None else gen.max_tokens
    if max_tokens > room:
        raise invalid("max_tokens", f"{len(prompt)} prompt tokens + max_tokens {max_tokens} exceed the model's "
                                    f"context of {info.max_context_length} tokens (at most {room} here)",
                      code="context_length_exceeded")
    params = SamplingParams(max_tokens=max_tokens, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                            seed=gen.seed, stop_strings=gen.stop)
    score_prompt = gen.echo and gen.logprobs
    return SampleTask(f"oai-{uuid.uuid4().hex}", ref, prompt, gen.n, params, prompt_logprobs=score_prompt,
                      topk_prompt_logprobs=gen.top_logprobs if score_prompt else 0,
                      topk_sample_logprobs=gen.top_logprobs if gen.logprobs else 0, stream=gen.stream)


async def _answer(reply: Reply, client_gone: ClientGone) -> dict | AsyncIterator[str]:
    st = reply.st
    if st.scheduler.pending_samples + len(reply.tasks) > st.config.max_pending_samples:
        raise OpenAIError(429, f"the sampling queue is full ({st.config.max_pending_samples} requests); retry "
                               f"in {RETRY_AFTER_SECONDS} s", code="rate_limit_exceeded", type="rate_limit_error",
                          retry_after=RETRY_AFTER_SECONDS)
    channel = SampleChannel()
    for task in reply.tasks:
        st.scheduler.submit_sample(task, None, channel=channel)
    gone = asyncio.ensure_future(client_gone())
    try:
        event = await _next_event(channel, gone)
        if reply.generation.stream:
            return _stream(reply, channel, event, gone)  # which cancels `gone` when it ends
        while True:
            _apply(reply, event)
            if reply.done:
                return _body(reply)
            event = await _next_event(channel, gone)
    except BaseException:
        reply.cancel_unfinished("the request failed or its client went away")
        raise
    finally:
        if not reply.generation.stream:
            gone.cancel()


class ClientLeft(OpenAIError):
    """The client closed its connection while its request was running (nobody reads the answer: nginx's 499)."""

    def __init__(self) -> None:
        super().__init__(499, "the client closed the connection", type="client_closed_request")


async def _next_event(channel: SampleChannel, gone: asyncio.Future) -> SampleEvent:
    """The next event of the reply's requests; an error event raises `OpenAIError`, a departed client `ClientLeft`."""
    event = asyncio.ensure_future(channel.next())
    await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not event.done():
        event.cancel()
        raise ClientLeft()
    if event.result().error is not None:
        raise _error(event.result())
    return event.result()


def _error(event: SampleEvent) -> OpenAIError:
    if event.category == USER:
        field_name = event.error.split(":", 1)[0]
        return OpenAIError(400, event.error, param=field_name if field_name.isidentifier() else None)
    if event.category == LOST:
        return OpenAIError(503, event.error, type="server_error", code="engine_lost", retry_after=RETRY_AFTER_SECONDS)
    return OpenAIError(500, event.error, type="server_error")


def _apply(reply: Reply, event: SampleEvent) -> list[tuple[int, Delta]]:
    """Feed an event into the choices; the (choice index, delta) pairs it produced."""
    deltas: list[tuple[int, Delta]] = []
    if event.progress:
        by_choice: dict[int, list] = {}
        for p in event.progress:
            by_choice.setdefault(p.sample, []).append(p)
        for sample, items in by_choice.items():
            index, choice = reply.choices[(event.request_id, sample)]
            deltas.append((index, choice.add([p.token for p in items], [p.logprob for p in items],
                                             [p.topk for p in items])))
    if event.result is not None:
        reply.results[event.request_id] = event.result
        _record(reply, event.request_id, event.result)
        for sample, sequence in enumerate(event.result.sequences):
            index, choice = reply.choices[(event.request_id, sample)]
            deltas.append((index, choice.finish(sequence)))
    for index, delta in deltas:
        reply.texts[index] += delta.text
        reply.entries[index] += delta.tokens
    return deltas


def _record(reply: Reply, request_id: str, result: SampleResult) -> None:
    """The request's sampled tokens on the curves of the run whose weights answered (none for a base model)."""
    task = next(t for t in reply.tasks if t.request_id == request_id)
    run = snapshot_run(task.adapter.uri, reply.st.paths.versions) or _checkpoint_run(reply.generation.model)
    curves.record_sample(reply.st.store, reply.owner, None, run, sum(len(s.tokens) for s in result.sequences),
                         len(result.sequences), time.perf_counter() - reply.started)


def _checkpoint_run(model: str) -> str | None:
    """The run of a `tinker://<run>/...` model name (or `<base>;tinker://...`); None for a base model."""
    path = model.partition(";")[2] or model
    return path[len(PREFIX):].split("/", 1)[0] if path.startswith(PREFIX) else None


# Bodies

def _body(reply: Reply) -> dict:
    """The whole response of a non-streaming request (every result is in)."""
    finish = {index: choice.finish_reason for index, choice in reply.choices.values()}
    choices = [_choice(reply, index, reply.texts[index], reply.entries[index], finish[index], whole=True)
               for index in sorted(reply.texts)]
    return {"id": reply.id, "object": "chat.completion" if reply.chat else "text_completion", "created": reply.created,
            "model": reply.generation.model, "system_fingerprint": None, "choices": choices, "usage": reply.usage()}


def _choice(reply: Reply, index: int, text: str, tokens: list, finish_reason: str | None, whole: bool = False,
            first: bool = False) -> dict:
    """One entry of `choices`: a message (chat) or text (completion), or a chunk's delta when streaming."""
    gen, tokenizer = reply.generation, reply.tokenizer
    echo_text, echo_scores = "", []
    if not reply.chat and gen.echo and (whole or first):
        task = reply.tasks[index // gen.n]
        echo_text = tokenizer.decode(task.prompt, skip_special_tokens=False)
        if gen.logprobs:
            result = reply.results.get(task.request_id)
            echo_scores = prompt_scores(task.prompt, result.prompt_logprobs if result else None,
                                        result.topk_prompt_logprobs if result else None, gen.top_logprobs)
    logprobs = None
    if gen.logprobs and (tokens or echo_scores or whole):
        logprobs = chat_logprobs(tokenizer, tokens) if reply.chat else \
            completion_logprobs(tokenizer, echo_scores + tokens)
    if reply.chat and whole:
        return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": logprobs, "finish_reason": finish_reason}
    if reply.chat:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text or tokens else {})
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "text": echo_text + text, "logprobs": logprobs, "finish_reason": finish_reason}


# Streaming

def _chunk(reply: Reply, choices: list[dict], with_usage: bool = False) -> str:
    chunk = {"id": reply.id, "object": "chat.completion.chunk" if reply.chat else "text_completion",
             "created": reply.created, "model": reply.generation.model, "system_fingerprint": None, "choices": choices}
    if reply.generation.include_usage:
        chunk["usage"] = reply.usage() if with_usage else None
    return f"data: {json.dumps(chunk)}\n\n"


async def _stream(reply: Reply, channel: SampleChannel, first: SampleEvent, gone: asyncio.Future) -> AsyncIterator[str]:
    """Server-sent events: a first chunk per choice (the role; echoed prompt), deltas as tokens come, each
    choice's finish_reason, the usage chunk if asked, then `[DONE]`. Closing it early cancels the rows."""
    try:
        if reply.chat or reply.generation.echo:
            yield _chunk(reply, [_choice(reply, index, "", [], None, first=True)
                                 for index, _ in sorted(reply.choices.values(), key=lambda c: c[0])])
        event = first
        while True:
            for index, delta in _apply(reply, event):
                if delta.text or (delta.tokens and reply.generation.logprobs):
                    yield _chunk(reply, [_choice(reply, index, delta.text, delta.tokens, None)])
                if delta.finish_reason is not None:
                    yield _chunk(reply, [_choice(reply, index, "", [], delta.finish_reason)])
            if reply.done:
                break
            try:
                event = await _next_event(channel, gone)
            except OpenAIError as exc:  # the status line is sent: report the error in the stream
                yield f"data: {json.dumps(exc.body())}\n\n"
                break
        if reply.generation.include_usage and reply.done:
            yield _chunk(reply, [], with_usage=True)
        yield "data: [DONE]\n\n"
    finally:
        gone.cancel()
        reply.cancel_unfinished("the client closed the stream")
