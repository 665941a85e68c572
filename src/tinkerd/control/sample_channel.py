"""Sample requests answered on the event loop rather than through the future board.

The SDK's `asample` gets a future that it polls; an OpenAI-style request holds its HTTP connection
open instead and wants each token as it is drawn. The scheduler feeds a `SampleChannel` with a
request's new tokens after every decode step (when the sampler can report them), then its result
or its error. The channel only carries events, on the event loop's thread; it knows nothing about
what the caller renders from them, and keeps nothing durable (a lost connection is a lost request).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tinkerd.engine.interface import TokenProgress
from tinkerd.protocol.types import SampleResult

USER, SERVER, LOST = "user", "server", "lost"  # why a request failed: its own fault, ours, or "send it again"


@dataclass(frozen=True)
class SampleEvent:
    request_id: str
    progress: list[TokenProgress] | None = None  # new tokens (a streaming request on a streaming sampler)
    result: SampleResult | None = None  # the request finished: every token of every sample
    error: str | None = None  # the request failed (or was cancelled): why
    category: str | None = None  # USER, SERVER or LOST with `error`

    @property
    def final(self) -> bool:
        return self.result is not None or self.error is not None


class SampleChannel:
    """The events of one or more sample requests, in the order the scheduler produced them."""

    def __init__(self) -> None:
        self._events: asyncio.Queue[SampleEvent] = asyncio.Queue()

    def tokens(self, request_id: str, progress: list[TokenProgress]) -> None:
        self._events.put_nowait(SampleEvent(request_id, progress=progress))

    def finished(self, request_id: str, result: SampleResult) -> None:
        self._events.put_nowait(SampleEvent(request_id, result=result))

    def failed(self, request_id: str, error: str, category: str) -> None:
        self._events.put_nowait(SampleEvent(request_id, error=error, category=category))

    async def next(self) -> SampleEvent:
        return await self._events.get()
