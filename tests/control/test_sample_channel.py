"""Sample requests answered on a `SampleChannel`: a streaming sampler's tokens arrive step by step before the
result, a sampler that cannot stream is never asked to (and the channel gets the whole result), an engine
failure and a cancellation reach the channel instead of the future board."""

import asyncio

import numpy as np

from tinkerd.control.futures import FutureBoard
from tinkerd.control.sample_channel import SERVER, USER, SampleChannel
from tinkerd.control.scheduler import Scheduler
from tinkerd.engine.interface import AdapterRef, SampleTask, StreamingSampler, TokenProgress
from tinkerd.protocol.types import SampledSequence, SampleResult, SamplingParams
from tinkerd.store.db import open_store


class CountingSampler:
    """Draws tokens 10, 11, 12... one per step for each request; finishes after `length` tokens."""

    def __init__(self, length: int = 3, fail: bool = False) -> None:
        self.length, self.fail = length, fail
        self.submitted: list[SampleTask] = []
        self.active: dict[str, list[int]] = {}
        self.cancelled: set[str] = set()

    def submit(self, request):
        self.submitted.append(request)
        self.active[request.request_id] = []

    def cancel(self, request_id):
        self.cancelled.add(request_id)
        self.active.pop(request_id, None)

    def has_work(self):
        return bool(self.active)

    def step(self):
        if self.fail:
            raise RuntimeError("the GPU fell off")
        done, self.progress = [], []
        for request_id, tokens in list(self.active.items()):
            tokens.append(10 + len(tokens))
            self.progress.append(TokenProgress(request_id, 0, tokens[-1], -0.5))
            if len(tokens) == self.length:
                del self.active[request_id]
                done.append((request_id, SampleResult([SampledSequence(tokens, [-0.5] * len(tokens), "length")])))
        return done


class StreamingCountingSampler(CountingSampler):
    def take_progress(self):
        return self.progress


def _task(stream=True) -> SampleTask:
    return SampleTask(f"r-{np.random.randint(1 << 30)}", AdapterRef(None, "tiny"), [1, 2], 1,
                      SamplingParams(max_tokens=3), stream=stream)


def _events(tmp_path, sampler, cancel_after: int | None = None):
    async def main():
        board = FutureBoard(open_store(None, tmp_path))
        board.bind_loop(asyncio.get_running_loop())
        scheduler = Scheduler(board, lambda calls: [], sampler)
        scheduler.start()
        channel, task = SampleChannel(), _task()
        scheduler.submit_sample(task, None, channel=channel)
        events = []
        while not events or not events[-1].final:
            events.append(await asyncio.wait_for(channel.next(), 5))
            if cancel_after is not None and len(events) == cancel_after:
                scheduler.cancel_sample(task.request_id, "the client left")
        await scheduler.stop()
        assert scheduler.pending_samples == 0 and board.store.future(task.request_id) is None  # never on the board
        return events

    return asyncio.run(main())


def test_a_streaming_sampler_reports_each_token_before_the_result(tmp_path):
    sampler = StreamingCountingSampler()
    assert isinstance(sampler, StreamingSampler) and not isinstance(CountingSampler(), StreamingSampler)
    events = _events(tmp_path, sampler)
    assert [[p.token for p in e.progress] for e in events[:-1]] == [[10], [11], [12]]
    assert events[-1].result.sequences[0].tokens == [10, 11, 12] and sampler.submitted[0].stream


def test_a_sampler_that_cannot_stream_is_not_asked_to_and_sends_the_whole_result(tmp_path):
    sampler = CountingSampler()
    events = _events(tmp_path, sampler)
    assert len(events) == 1 and events[0].result.sequences[0].tokens == [10, 11, 12]
    assert sampler.submitted[0].stream is False


def test_cancelling_and_engine_failures_reach_the_channel(tmp_path):
    sampler = StreamingCountingSampler(length=50)
    events = _events(tmp_path / "cancel", sampler, cancel_after=2)
    assert events[-1].error == "the client left" and events[-1].category == USER
    assert sampler.cancelled == {sampler.submitted[0].request_id}
    failed = _events(tmp_path / "fail", StreamingCountingSampler(fail=True))
    assert failed[-1].category == SERVER and "GPU fell off" in failed[-1].error
