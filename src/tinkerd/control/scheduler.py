"""Per-model ordering and the engine worker: training jobs and the sampler's decode steps.

Training requests carry `seq_id` = 1, 2, 3... per model and arrive concurrently and out of order.
The scheduler holds each model's requests until the gap below them fills, then queues them for
the engine worker in order. The worker runs on one dedicated engine thread (the engine owns the
cores). When it picks a forward/forward_backward job it also takes every other forward job that
is queued before the next barrier (optim_step, saves, loads...), from any tenant, and runs them
together as one multi-tenant batch, never reordering training. Tenants of the previous batch
whose next request has not arrived yet get a short gather window (`gather_seconds`), so a tenant
whose result came back first does not run alone. Runs take turns (`_take_turns`), so one run's long
queue, e.g. its replay after a restart, does not hold up the others. Between training jobs the worker
advances the sampler one decode step at a time (continuous batching: new requests join the
running batch), alternating with training when both have work. A sample request is answered on the future
board (the SDK polls it) or, given a `SampleChannel`, on that channel: with its new tokens after each step if
the sampler reports them (`StreamingSampler`), then its result. Knows nothing about torch or the wire format.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tinkerd.engine.interface import ordered_op
from tinkerd.engine.interface import RunLost, SampleTask, Sampler, StreamingSampler, TokenProgress, snapshot_run
from tinkerd.protocol.types import BadRequest, ForwardBackwardCall, ForwardBackwardResult, SampleResult
from tinkerd.control.futures import FutureBoard
from tinkerd.control.metrics import ServerMetrics
from tinkerd.control.sample_channel import LOST, SERVER, USER, SampleChannel

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a job produced: a JSON result, a protobuf result, or both."""

    json: dict | None = None
    pb: bytes | None = None


@dataclass
class Job:
    future_id: str | None  # None: internal work (unloading, restoring) with no client waiting; failures are logged
    kind: str
    run: Callable[[], Outcome] | None = None  # called on the engine thread
    call: ForwardBackwardCall | None = None  # batchable forward / forward_backward
    encode: Callable[[ForwardBackwardResult], Outcome] | None = None
    model_id: str | None = None  # the model whose order it keeps (set by `submit_ordered`)
    seq_id: int | None = None  # its place in that order, which the engine's fence checks (set by `submit_ordered`)


@dataclass
class ModelQueue:
    next_seq: int = 1
    waiting: dict[int, Job] = field(default_factory=dict)


BatchRunner = Callable[[list[ForwardBackwardCall]], list[ForwardBackwardResult | Exception]]


@dataclass
class PendingSample:
    encode: Callable[[SampleResult], Outcome]  # the result's wire forms, made on the engine thread
    session_id: str | None  # the sampling session's client session, if any
    adapter_uri: str | None = None  # the weights it samples (a run's `mem://` snapshot, a folder, or the base model)
    channel: SampleChannel | None = None  # answer there (tokens as drawn, then the raw result), not on the board

    def fail(self, board: FutureBoard, request_id: str, error: str, category: str) -> None:
        if self.channel is not None:
            self.channel.failed(request_id, error, category)
        elif category == LOST:
            board.lose(request_id, error)
        else:
            board.fail(request_id, error, category)


class Scheduler:
    def __init__(self, board: FutureBoard, run_forward_batch: BatchRunner, sampler: Sampler,
                 metrics: ServerMetrics | None = None, gather_seconds: float = 0.0,
                 versions_root: Path | None = None) -> None:
        """`versions_root`: where sampler snapshots are written as version folders (to tell whose run a sample's
        weights are, `snapshot_run`); None: only in-memory snapshots name a run."""
        self.board = board
        self.versions_root = versions_root
        # A job whose run the engine lost (`RunLost`): called with the run's model_id; True means the run is
        # being rebuilt (from the journal, which hands the job over again), so its future stays pending.
        self.on_run_lost: Callable[[str], bool] = lambda model_id: False
        self.gather_seconds = gather_seconds
        self._partners: set[str] = set()  # the models of the last forward batch
        self._last_model: str | None = None  # the run of the last job (`_take_turns`)
        self.metrics = metrics or ServerMetrics()
        self.metrics.training_queue.set_function(lambda: len(self.jobs))
        self.metrics.sampling_requests.set_function(lambda: len(self.samples))
        self.run_forward_batch = run_forward_batch
        self.sampler = sampler
        self.models: dict[str, ModelQueue] = {}
        self.jobs: collections.deque[Job] = collections.deque()
        self.samples: dict[str, PendingSample] = {}  # request id -> how to answer it
        self._ready = asyncio.Event()
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

    def close_model(self, model_id: str) -> list[Job]:
        """Stop accepting requests for a model; returns its jobs still waiting for a lower seq_id (never run)."""
        queue = self.models.pop(model_id, None)
        return [] if queue is None else [queue.waiting[seq] for seq in sorted(queue.waiting)]

    @property
    def pending_samples(self) -> int:
        return len(self.samples)

    def submit(self, job: Job) -> None:
        self.jobs.append(job)
        self._ready.set()

    def submit_sample(self, request: SampleTask, encode: Callable[[SampleResult], Outcome] | None,
                      session_id: str | None = None, channel: SampleChannel | None = None) -> None:
        """`encode`: the result's wire forms for the board; unused (None) with a `channel`. A sampler that cannot
        report tokens as drawn (not a `StreamingSampler`: Ray, vLLM) is not asked to keep them."""
        self.samples[request.request_id] = PendingSample(encode, session_id, request.adapter.uri, channel)
        if request.stream and (channel is None or not isinstance(self.sampler, StreamingSampler)):
            request = dataclasses.replace(request, stream=False)
        self.sampler.submit(request)
        self._ready.set()

    def cancel_sample(self, request_id: str, reason: str = "cancelled by the client") -> None:
        pending = self.samples.pop(request_id, None)
        if pending is not None:
            self.sampler.cancel(request_id)
            pending.fail(self.board, request_id, reason, USER)
            self._ready.set()  # the next step drops its rows

    def sample_sessions(self) -> set[str]:
        return {p.session_id for p in self.samples.values() if p.session_id is not None}

    def cancel_session_samples(self, session_id: str, reason: str) -> None:
        """Abandoned requests: the rows of a session that ended stop decoding at the next step."""
        for request_id in [r for r, p in self.samples.items() if p.session_id == session_id]:
            self.cancel_sample(request_id, reason)

    def drop_jobs(self, model_id: str) -> int:
        """Forget a run's queued jobs (its journal hands them over again); returns how many."""
        kept = collections.deque(job for job in self.jobs if job.model_id != model_id)
        dropped, self.jobs = len(self.jobs) - len(kept), kept
        return dropped

    def _rebuilding(self, job_model: str | None, exc: Exception, asked: dict[str, bool] | None = None) -> bool:
        """Whether a job's failure is its run being lost and the run is being rebuilt (its future stays pending).
        `asked`: the answers for runs of the same batch, so a run is rebuilt once per failure."""
        model_id = getattr(exc, "model_id", None) or job_model
        if not isinstance(exc, RunLost) or model_id is None:
            return False
        if asked is None:
            return self.on_run_lost(model_id)
        if model_id not in asked:
            asked[model_id] = self.on_run_lost(model_id)
        return asked[model_id]

    def submit_ordered(self, model_id: str, seq_id: int | None, job: Job) -> None:
        """Queue a training job; it runs once every lower seq_id of its model has been handed over."""
        queue = self.models[model_id]
        job.model_id, job.seq_id = model_id, seq_id
        if not seq_id:  # older SDKs send no seq_id: arrival order
            self.submit(job)
            return
        if seq_id < queue.next_seq or seq_id in queue.waiting:
            raise BadRequest(f"seq_id {seq_id} for model {model_id} was already used by a different request")
        queue.waiting[seq_id] = job
        while queue.next_seq in queue.waiting:
            self.submit(queue.waiting.pop(queue.next_seq))
            queue.next_seq += 1

    def _take_forward_batch(self, first: Job) -> list[Job]:
        """`first` plus every queued forward job that no earlier job of its model must precede.

        Tenants submit forward_backward and optim_step back to back, so the queue interleaves them;
        a forward job of model B may pass model A's optim_step (their order is independent), but not
        one of B's own. Jobs of no model (unloading, restoring) are barriers for everyone.
        """
        batch, rest, blocked = [first], collections.deque(), set()
        while self.jobs:
            job = self.jobs.popleft()
            if job.call is not None and job.call.model_id not in blocked:
                batch.append(job)
                continue
            rest.append(job)
            if job.model_id is None:
                rest.extend(self.jobs)
                self.jobs.clear()
            else:
                blocked.add(job.model_id)
        self.jobs = rest
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        sample_turn = False
        while True:
            while not self.jobs and not self.sampler.has_work():
                self._ready.clear()
                await self._ready.wait()
            sample_turn = not sample_turn
            if self.sampler.has_work() and (sample_turn or not self.jobs):
                started = time.perf_counter()
                await self._sample_step(loop)
                self.metrics.engine_seconds.labels("sample_step").observe(time.perf_counter() - started)
                continue
            self._take_turns()
            if self.jobs[0].call is not None and self.gather_seconds > 0:
                await self._await_partners(self.jobs[0].call.model_id)
            job = self.jobs.popleft()
            self._last_model = job.model_id if job.call is None else None  # a forward batch served all its runs
            started = time.perf_counter()
            if job.call is not None:
                batch = self._take_forward_batch(job)
                await self._run_forward(loop, batch)
                label = f"forward batch of {len(batch)}"
            else:
                await self._run_one(loop, job)
                label = job.kind
            seconds = time.perf_counter() - started
            self.metrics.engine_seconds.labels("forward_batch" if job.call is not None else job.kind).observe(seconds)
            log.info("engine %s %.1f ms", label, seconds * 1e3)

    def _take_turns(self) -> None:
        """Runs take turns: if the next job is of the run that had the last one, the earliest job of another run
        queued before the next barrier goes first. One run's long queue (a replay after a restart, a burst of
        saves) then delays another's request by one job, not by the whole queue. A run's own jobs keep their
        order, and nothing passes a job of no run (a barrier)."""
        if self._last_model is None or self.jobs[0].model_id != self._last_model:
            return
        for i, job in enumerate(self.jobs):
            if job.model_id is None:
                return
            if job.model_id != self._last_model:
                del self.jobs[i]
                self.jobs.appendleft(job)
                return

    async def _await_partners(self, model_id: str) -> None:
        """Wait up to `gather_seconds` until every still-open model of the last forward batch has a
        request queued. Their clients are answered one by one, so without this the first to send its
        next step would run alone and the rest in a second batch. A lone tenant never waits, nor does
        anyone while the sampler has rows to advance."""
        deadline = time.monotonic() + self.gather_seconds
        while not self.sampler.has_work():
            queued = {job.model_id for job in self.jobs} | {model_id}
            missing = [m for m in self._partners if m in self.models and m not in queued]
            remaining = deadline - time.monotonic()
            if not missing or remaining <= 0:
                return
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _run_forward(self, loop: asyncio.AbstractEventLoop, batch: list[Job]) -> None:
        self._partners = {job.call.model_id for job in batch}
        def run() -> list[Outcome | Exception]:
            results = self.run_forward_batch([j.call for j in batch])
            return [r if isinstance(r, Exception) else j.encode(r) for j, r in zip(batch, results)]

        try:
            outcomes = await loop.run_in_executor(self._executor, run)
        except Exception as exc:  # noqa: BLE001 - an engine failure fails every request of the batch
            log.exception("forward batch failed")
            for job in batch:
                self.board.fail(job.future_id, f"{type(exc).__name__}: {exc}", "server")
            return
        rebuilding: dict[str, bool] = {}
        for job, outcome in zip(batch, outcomes):
            if isinstance(outcome, BadRequest):
                self.board.fail(job.future_id, str(outcome), "user")
            elif isinstance(outcome, Exception) and self._rebuilding(job.call.model_id, outcome, rebuilding):
                continue
            elif isinstance(outcome, Exception):  # e.g. the engine lost that request's run
                self.board.fail(job.future_id, f"{type(outcome).__name__}: {outcome}", "server")
            else:
                if not job.call.forward_only:
                    self.metrics.tokens_trained.inc(sum(len(d.tokens) for d in job.call.data))
                self.board.complete(job.future_id, outcome.json, outcome.pb)

    async def _sample_step(self, loop: asyncio.AbstractEventLoop) -> None:
        streaming = isinstance(self.sampler, StreamingSampler)

        def run() -> tuple[list[TokenProgress], list[tuple[str, SampleResult | Outcome | Exception]]]:
            out = []
            for request_id, result in self.sampler.step():
                pending = self.samples.get(request_id)
                if pending is not None and not isinstance(result, Exception):
                    self.metrics.tokens_sampled.inc(sum(len(seq.tokens) for seq in result.sequences))
                    if pending.channel is None:
                        result = pending.encode(result)
                out.append((request_id, result))
            return (self.sampler.take_progress() if streaming else []), out

        try:
            progress, finished = await loop.run_in_executor(self._executor, run)
        except Exception as exc:  # noqa: BLE001 - a failed decode step fails the requests in flight
            log.exception("sampling step failed")
            for request_id, pending in list(self.samples.items()):
                pending.fail(self.board, request_id, f"{type(exc).__name__}: {exc}", SERVER)
            self.samples.clear()
            return
        self._forward_progress(progress)
        rebuilding: dict[str, bool] = {}
        for request_id, outcome in finished:
            pending = self.samples.pop(request_id, None)
            if pending is None:
                continue  # cancelled meanwhile
            if isinstance(outcome, RunLost):  # sampling changes nothing: the client may send it again (410)
                run = snapshot_run(pending.adapter_uri, self.versions_root)
                if run is not None and self._rebuilding(run, outcome, rebuilding):
                    pending.fail(self.board, request_id, f"{outcome}; the server is rebuilding its training run: "
                                                         "send the request again", LOST)
                else:
                    pending.fail(self.board, request_id, f"{outcome}; send the request again", LOST)
            elif isinstance(outcome, BadRequest):
                pending.fail(self.board, request_id, str(outcome), USER)
            elif isinstance(outcome, Exception):
                pending.fail(self.board, request_id, f"{type(outcome).__name__}: {outcome}", SERVER)
            elif pending.channel is not None:
                pending.channel.finished(request_id, outcome)
            else:
                self.board.complete(request_id, outcome.json, outcome.pb)

    def _forward_progress(self, progress: list[TokenProgress]) -> None:
        """Each channel gets its requests' new tokens (one event per request and step, in draw order)."""
        by_request: dict[str, list[TokenProgress]] = {}
        for item in progress:
            by_request.setdefault(item.request_id, []).append(item)
        for request_id, items in by_request.items():
            pending = self.samples.get(request_id)
            if pending is not None and pending.channel is not None:
                pending.channel.tokens(request_id, items)

    async def _run_one(self, loop: asyncio.AbstractEventLoop, job: Job) -> None:
        try:
            outcome = await loop.run_in_executor(self._executor, _in_order(job))
            if job.future_id is not None:
                self.board.complete(job.future_id, outcome.json, outcome.pb)
        except BadRequest as exc:
            if job.future_id is None:
                log.warning("engine job %s: %s", job.kind, exc)
            else:
                self.board.fail(job.future_id, str(exc), "user")
        except Exception as exc:  # noqa: BLE001 - any engine failure becomes that request's error
            if self._rebuilding(job.model_id, exc):
                log.warning("engine job %s (%s): %s; the run is being rebuilt", job.future_id, job.kind, exc)
                return
            log.exception("engine job %s (%s) failed", job.future_id, job.kind)
            if job.future_id is not None:
                self.board.fail(job.future_id, f"{type(exc).__name__}: {exc}", "server")


def _in_order(job: Job) -> Callable[[], Outcome]:
    """The job's work, telling the engine which of its model's operations the trainer calls belong to."""
    def run() -> Outcome:
        with ordered_op(job.model_id, job.seq_id):
            return job.run()
    return run
