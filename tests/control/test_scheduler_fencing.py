"""The scheduler tells the engine which operation a job's trainer calls belong to, so the engine's
fence (tinkerd.backends.fencing) can check the order it is handed."""

import asyncio

from tinkerd.backends.fencing import FencedTrainer
from tinkerd.engine.interface import current_op
from tinkerd.protocol.types import AdamParams
from tinkerd.control.futures import FutureBoard
from tinkerd.control.scheduler import Job, Outcome, Scheduler
from tinkerd.store.db import open_store
from tests.control.test_scheduler import settle


class NoSampler:
    def has_work(self):
        return False


class StepCounter:
    def __init__(self):
        self.seen: list = []

    def optim_step(self, model_id, params):
        self.seen.append(current_op())
        return {"steps": float(len(self.seen))}


def test_ordered_jobs_run_as_their_model_and_seq_id(tmp_path):
    inner = StepCounter()
    trainer = FencedTrainer(inner)

    async def main():
        board = FutureBoard(open_store(None, tmp_path))
        board.bind_loop(asyncio.get_running_loop())
        scheduler = Scheduler(board, lambda calls: [], NoSampler())
        scheduler.open_model("a")
        futures = []

        def step() -> Outcome:
            return Outcome(json=trainer.optim_step("a", AdamParams()))

        for seq in (2, 1):
            futures.append(board.create("owner", "optim_step"))
            scheduler.submit_ordered("a", seq, Job(futures[-1], "optim_step", step))
        futures.append(board.create("owner", "unordered"))
        scheduler.submit(Job(futures[-1], "unordered", step))
        scheduler.start()
        await settle(board, futures)
        await scheduler.stop()
        return [board.store.future(f) for f in futures]

    rows = asyncio.run(main())
    assert [r["state"] for r in rows] == ["done"] * 3
    # seq 1 then 2 in order; the unordered job carries no seq_id (and so is not fenced)
    assert inner.seen == [("a", 1), ("a", 2), None]
