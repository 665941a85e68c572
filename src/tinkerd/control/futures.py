"""Futures: every asynchronous operation gets a request id, a Store row, and waiters.

Results are written to the Store before waiters wake, so a result a client may have seen is
durable. `wait` long-polls: it returns the finished row, or None after the timeout (the route
then answers `try_again`). Knows nothing about what the operations are.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Callable

from tinkerd.store.db import Store


class FutureBoard:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._events: dict[str, asyncio.Event] = {}
        self._on_finish: dict[str, Callable[[str], None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def create(self, owner: str, kind: str, model_id: str | None = None, seq_id: int | None = None,
               request: bytes | None = None) -> str:
        """A new pending future; `request` is its journal entry (see `tinkerd.control.journal`)."""
        future_id = f"{kind}-{uuid.uuid4().hex}"
        self.store.add_future(future_id, owner, kind, model_id, seq_id, request)
        self.track(future_id)
        return future_id

    def track(self, future_id: str) -> None:
        """Waiters of a pending future (one an earlier process created, too) are woken when it finishes."""
        self._events.setdefault(future_id, asyncio.Event())

    def complete(self, future_id: str | None, result_json: dict | None = None, result_pb: bytes | None = None) -> None:
        """None: work no client waits for (a replayed request that had finished); nothing to record."""
        if future_id is None:
            return
        self.store.complete_future(future_id, result_json, result_pb)
        self._wake(future_id)

    def fail(self, future_id: str | None, error: str, category: str) -> None:
        if future_id is None:
            return
        self.store.fail_future(future_id, error, category)
        self._wake(future_id)

    def lose(self, future_id: str, error: str) -> None:
        """A sample request that cannot finish but may be sent again (answered 410, which the SDK resends)."""
        self.store.fail_future(future_id, error, "server", state="lost")
        self._wake(future_id)

    def when_finished(self, future_id: str, fn: Callable[[str], None]) -> None:
        """Call `fn(future_id)` once the future completes, fails or is lost (on the thread that ends it)."""
        self._on_finish[future_id] = fn

    def _wake(self, future_id: str) -> None:
        on_finish = self._on_finish.pop(future_id, None)
        if on_finish is not None:
            on_finish(future_id)
        event = self._events.pop(future_id, None)
        if event is None:
            return
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(event.set)
        else:
            event.set()

    async def wait(self, future_id: str, timeout: float) -> dict | None:
        row = self.store.future(future_id)
        if row is None or row["state"] != "pending":
            return row
        event = self._events.get(future_id)
        if event is None:  # pending in the Store but unknown here: finished concurrently, re-read
            return self.store.future(future_id)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            return None
        return self.store.future(future_id)
