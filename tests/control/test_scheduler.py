"""The scheduler against a fake engine: per-model seq_id order (gaps wait, reuse is refused) and
forward batches that gather every tenant's ready forward_backward without reordering any model."""

import asyncio

import pytest

from tinkerd.engine.interface import AdapterRef, RunLost, SampleTask
from tinkerd.protocol.types import BadRequest, ForwardBackwardCall, ForwardBackwardResult, SamplingParams
from tinkerd.control.futures import FutureBoard
from tinkerd.control.scheduler import Job, Outcome, Scheduler
from tinkerd.store.db import open_store


class NoSampler:
    def has_work(self):
        return False


async def settle(board, futures, tries: int = 500) -> None:
    """Wait until no future of `futures` is pending (10 ms polls)."""
    for _ in range(tries):
        if all(board.store.future(f)["state"] != "pending" for f in futures):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("requests still pending")


def _run(tmp_path, submissions):
    """Submit (model, seq, kind) in order while the engine is stopped, then run; returns what the
    engine did, in order: ("batch", [(model, seq), ...]) or (kind, model, seq)."""
    done: list = []

    def forward_batch(calls):
        done.append(("batch", [(c.model_id, c.seq_id) for c in calls]))
        return [ForwardBackwardResult([], {}) for _ in calls]

    async def main():
        board = FutureBoard(open_store(None, tmp_path))
        board.bind_loop(asyncio.get_running_loop())
        scheduler = Scheduler(board, forward_batch, NoSampler())
        futures = []
        for model, seq, kind in submissions:
            if model not in scheduler.models:
                scheduler.open_model(model)
            future_id = board.create("owner", kind)  # the Store's own (model, seq) uniqueness is tested elsewhere
            if kind == "forward_backward":
                job = Job(future_id, kind, call=ForwardBackwardCall(model, seq, "cross_entropy", {}, False, []),
                          encode=lambda result: Outcome(json={}))
            else:
                job = Job(future_id, kind, run=lambda m=model, s=seq, k=kind: done.append((k, m, s)) or Outcome(json={}))
            scheduler.submit_ordered(model, seq, job)
            futures.append(future_id)
        scheduler.start()
        await settle(board, futures)
        await scheduler.stop()
        return [board.store.future(f)["state"] for f in futures]

    states = asyncio.run(main())
    return done, states


def test_interleaved_tenants_are_batched_without_reordering_any_model(tmp_path):
    # Each tenant sends forward_backward then optim_step back to back, as the SDK does.
    done, states = _run(tmp_path, [("a", 1, "forward_backward"), ("a", 2, "optim_step"),
                                   ("b", 1, "forward_backward"), ("b", 2, "optim_step"),
                                   ("c", 1, "forward_backward"), ("a", 3, "forward_backward"),
                                   ("c", 2, "optim_step")])
    assert states == ["done"] * 7
    assert done[0] == ("batch", [("a", 1), ("b", 1), ("c", 1)])  # a's second step waits for its optim_step
    assert done[1:4] == [("optim_step", "a", 2), ("optim_step", "b", 2), ("batch", [("a", 3)])]
    assert done[4] == ("optim_step", "c", 2)


def test_a_gap_waits_for_the_missing_seq_id_and_a_reused_seq_id_is_refused(tmp_path):
    done, states = _run(tmp_path, [("a", 2, "optim_step"), ("a", 1, "forward_backward")])
    assert done == [("batch", [("a", 1)]), ("optim_step", "a", 2)] and states == ["done"] * 2
    with pytest.raises(BadRequest, match="seq_id 1 for model a was already used"):
        _run(tmp_path / "again", [("a", 1, "forward_backward"), ("a", 1, "forward_backward")])


def _staggered(tmp_path, gather_seconds: float, close_b_before_round_3: bool = False):
    """Round 1: a and b's forward_backward queued together. Round 2: a's next one, b's 50 ms later.
    Round 3 (optional): b's model is closed, then a sends one more. Returns the batches run."""
    batches: list = []

    def forward_batch(calls):
        batches.append([(c.model_id, c.seq_id) for c in calls])
        return [ForwardBackwardResult([], {}) for _ in calls]

    async def main():
        board = FutureBoard(open_store(None, tmp_path))
        board.bind_loop(asyncio.get_running_loop())
        scheduler = Scheduler(board, forward_batch, NoSampler(), gather_seconds=gather_seconds)
        scheduler.start()

        async def send(model, seq):
            if model not in scheduler.models:
                scheduler.open_model(model)
            future_id = board.create("owner", "forward_backward")
            scheduler.submit_ordered(model, seq, Job(future_id, "forward_backward",
                                                     call=ForwardBackwardCall(model, seq, "cross_entropy", {}, False, []),
                                                     encode=lambda result: Outcome(json={})))
            return future_id

        await settle(board, [await send("a", 1), await send("b", 1)])
        first = await send("a", 2)
        await asyncio.sleep(0.05)
        await settle(board, [first, await send("b", 2)])
        if close_b_before_round_3:
            scheduler.close_model("b")
            await asyncio.wait_for(settle(board, [await send("a", 3)]), 2.0)  # never waits for a closed tenant
        await scheduler.stop()

    asyncio.run(main())
    return batches


def test_a_tenant_answered_first_waits_briefly_for_the_others_of_its_last_batch(tmp_path):
    assert _staggered(tmp_path, gather_seconds=5.0) == [[("a", 1), ("b", 1)], [("a", 2), ("b", 2)]]
    assert _staggered(tmp_path / "off", gather_seconds=0.0) == [[("a", 1), ("b", 1)], [("a", 2)], [("b", 2)]]


def test_the_gather_window_ignores_closed_tenants(tmp_path):
    batches = _staggered(tmp_path, gather_seconds=10.0, close_b_before_round_3=True)
    assert batches[-1] == [("a", 3)]


class LosingSampler:
    """Every request it is given fails as if its engine worker died."""

    def __init__(self):
        self.queued = []

    def submit(self, request):
        self.queued.append(request.request_id)

    def has_work(self):
        return bool(self.queued)

    def step(self):
        out, self.queued = [(r, RunLost("the engine actor died")) for r in self.queued], []
        return out


def test_a_lost_run_is_handed_to_the_rebuild_hook_once_and_its_futures_stay_pending(tmp_path):
    """A batch whose run the engine lost: with the hook saying "rebuilding", the jobs' futures are left to
    the rebuild (the journal answers them); a lost sample answers 410 (`lost`) so the client resends it;
    without a rebuild, the training job fails as a server error."""
    asked: list[str] = []

    def forward_batch(calls):
        return [RunLost("the engine actor died", c.model_id) for c in calls]

    async def main():
        board = FutureBoard(open_store(None, tmp_path))
        board.bind_loop(asyncio.get_running_loop())
        scheduler = Scheduler(board, forward_batch, LosingSampler())
        scheduler.on_run_lost = lambda model_id: asked.append(model_id) or model_id == "kept"
        futures = {}
        for model, seq in (("kept", 1), ("kept", 2), ("gone", 1)):
            scheduler.open_model(model)
            futures[(model, seq)] = board.create("owner", "forward_backward")
            scheduler.submit(Job(futures[(model, seq)], "forward_backward", model_id=model, seq_id=seq,
                                 call=ForwardBackwardCall(model, seq, "cross_entropy", {}, False, []),
                                 encode=lambda result: Outcome(json={})))
        sample = board.create("owner", "sample")
        scheduler.submit_sample(SampleTask(sample, AdapterRef("mem://kept@3", "tiny"), [1, 2], 1, SamplingParams()),
                                lambda result: Outcome(json={}))
        scheduler.start()
        await settle(board, [futures[("gone", 1)], sample])
        await scheduler.stop()
        return {key: board.store.future(f)["state"] for key, f in futures.items()}, board.store.future(sample)

    states, sample = asyncio.run(main())
    assert states == {("kept", 1): "pending", ("kept", 2): "pending", ("gone", 1): "error"}
    assert sorted(asked) == ["gone", "kept", "kept"]  # once per batch for "kept", then once for the sample
    assert sample["state"] == "lost" and "send the request again" in sample["error"]


def test_runs_take_turns_so_one_runs_long_queue_does_not_hold_up_another(tmp_path):
    """Issue 24, defect 7: run a's replay (many queued jobs) no longer keeps run b waiting for all of it;
    each run's own order is kept."""
    done, states = _run(tmp_path, [("a", seq, "optim_step") for seq in range(1, 6)] + [("b", 1, "optim_step"),
                                                                                         ("b", 2, "optim_step")])
    assert states == ["done"] * 7
    assert done == [("optim_step", "a", 1), ("optim_step", "b", 1), ("optim_step", "a", 2), ("optim_step", "b", 2),
                    ("optim_step", "a", 3), ("optim_step", "a", 4), ("optim_step", "a", 5)]
