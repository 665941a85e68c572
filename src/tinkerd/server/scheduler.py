"""Per-model ordering and the engine worker.

Training requests carry `seq_id` = 1, 2, 3... per model and arrive concurrently and out of order.
The scheduler holds each model's requests until the gap below them fills, then hands them to
the engine worker in order; a retried (model_id, seq_id) gets the future it already has.
Sampling and other unordered jobs go straight to the worker. The worker runs one job at a time
on a dedicated engine thread (the engine owns the cores) and reports each outcome to the
`FutureBoard`. Knows nothing about torch or the wire format.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from tinkerd.protocol.types import BadRequest
from tinkerd.server.futures import FutureBoard

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a job produced: a JSON result, a protobuf result, or both."""

    json: dict | None = None
    pb: bytes | None = None


@dataclass
class Job:
    future_id: str
    kind: str
    run: Callable[[], Outcome]  # called on the engine thread


@dataclass
class ModelQueue:
    next_seq: int = 1
    waiting: dict[int, Job] = field(default_factory=dict)


class Scheduler:
    def __init__(self, board: FutureBoard) -> None:
        self.board = board
        self.models: dict[str, ModelQueue] = {}
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.pending_samples = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinkerd-engine")
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def open_model(self, model_id: str, next_seq: int = 1) -> None:
        self.models.setdefault(model_id, ModelQueue(next_seq=next_seq))

    def submit(self, job: Job) -> None:
        if job.kind == "sample":
            self.pending_samples += 1
        self.queue.put_nowait(job)

    def submit_ordered(self, model_id: str, seq_id: int | None, job: Job) -> None:
        """Queue a training job; it runs once every lower seq_id of its model has been handed over."""
        queue = self.models[model_id]
        if not seq_id:  # older SDKs send no seq_id: arrival order
            self.submit(job)
            return
        if seq_id < queue.next_seq or seq_id in queue.waiting:
            raise BadRequest(f"seq_id {seq_id} for model {model_id} was already used by a different request")
        queue.waiting[seq_id] = job
        while queue.next_seq in queue.waiting:
            self.submit(queue.waiting.pop(queue.next_seq))
            queue.next_seq += 1

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self.queue.get()
            started = time.perf_counter()
            try:
                outcome = await loop.run_in_executor(self._executor, job.run)
                self.board.complete(job.future_id, outcome.json, outcome.pb)
            except BadRequest as exc:
                self.board.fail(job.future_id, str(exc), "user")
            except Exception as exc:  # noqa: BLE001 - any engine failure becomes that request's error
                log.exception("engine job %s (%s) failed", job.future_id, job.kind)
                self.board.fail(job.future_id, f"{type(exc).__name__}: {exc}", "server")
            finally:
                if job.kind == "sample":
                    self.pending_samples -= 1
                log.info("engine %s %s %.1f ms", job.kind, job.future_id, (time.perf_counter() - started) * 1e3)
