"""An online model's training run, driven the way a user's script drives one: ordinary requests in seq_id order.

`RunDriver` submits create_model / load_weights, forward, forward_backward, optim_step and inflight saves
through `control.ops` (so they are journaled, batched with everyone's work, recorded on the run's curves and
rebuilt after a crash like any run) and awaits their futures. It numbers the requests itself, continuing after
the highest seq_id the run ever used. Call it from the event loop. Knows `ops` and the futures board; not what
is trained (`learner`) nor HTTP.
"""

from __future__ import annotations

import asyncio

from tinkerd.control import ops
from tinkerd.control.plane import ControlPlane
from tinkerd.protocol.types import Datum, ForwardBackwardCall

INFLIGHT_SEQ = 0  # the run's one inflight sampling session: `<session>:sample:0`
YIELD_SECONDS = 5.0  # a training step waits at most this long for the sampler to drain (chats go first)


class OnlineRunError(RuntimeError):
    """A request of the online model's run failed (its message is the future's error)."""


async def result(st: ControlPlane, future_id: str) -> dict:
    """The future's JSON result once it is done; OnlineRunError if it failed."""
    while True:
        row = await st.board.wait(future_id, 30.0)
        if row is None:
            continue
        if row["state"] == "done":
            return row["result_json"] or {}
        if row["state"] != "pending":
            raise OnlineRunError(f"{row['kind']} failed: {row['error']}")
        await asyncio.sleep(0.05)  # pending, finished by another thread as we looked


class RunDriver:
    def __init__(self, st: ControlPlane, owner: str, model_id: str) -> None:
        self.st, self.owner, self.model_id = st, owner, model_id
        self.next_seq = st.store.max_seq_id(model_id) + 1

    def _seq(self) -> int:
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        return seq

    async def create(self, session: dict, base_model: str, rank: int, seed: int, source: dict | None,
                     train_unembed: bool = True) -> None:
        """The run at seq_id 0: a fresh LoRA on `base_model`, or the weights of checkpoint row `source`."""
        if source is None:
            args = {"session_id": session["id"], "model_seq_id": 0, "base_model": base_model,
                    "lora_config": {"rank": rank, "seed": seed, "train_unembed": train_unembed},
                    "user_metadata": {"online": True}}
            kind = "create_model"
        else:
            args = {"path": source["path"], "optimizer": False, "directory": source["directory"],
                    "base_model": source["base_model"], "session_id": session["id"],
                    "user_metadata": {"online": True}}
            kind = "load_weights"
        future = ops.create_run(self.st, self.owner, session, 0, kind, args)
        self.next_seq = 1
        await result(self.st, future["request_id"])

    def _call(self, data: list[Datum], forward_only: bool) -> dict:
        call = ForwardBackwardCall(self.model_id, self._seq(), "cross_entropy", {}, forward_only, data)
        return ops.queue_forward_backward(self.st, self.owner, call)

    async def forward(self, data: list[Datum]) -> list[list[float]]:
        """Per-position target logprobs of each datum under the run's current weights."""
        out = await result(self.st, self._call(data, True)["request_id"])
        return [o["logprobs"]["data"] for o in out["loss_fn_outputs"]]

    async def yield_to_samples(self) -> None:
        """Wait (at most YIELD_SECONDS) until no sample request is in the engine: the engine alternates sampling
        steps with training jobs, so a step queued behind a chat's decoding would stretch every token of it."""
        deadline = asyncio.get_running_loop().time() + YIELD_SECONDS
        while self.st.scheduler.pending_samples and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)

    async def train_step(self, data: list[Datum], learning_rate: float) -> dict:
        """forward_backward then optim_step, queued together once chats have drained; the forward_backward's
        result (`metrics`, and per datum `loss_fn_outputs[i]["logprobs"]` from before the step)."""
        await self.yield_to_samples()
        fb = self._call(data, False)
        step = ops.submit_training(self.st, self.owner, self.model_id, self._seq(), "optim_step",
                                   {"learning_rate": learning_rate})
        out = await result(self.st, fb["request_id"])
        await result(self.st, step["request_id"])
        return out

    async def publish(self) -> str:
        """An inflight save: the run's inflight session (and every chat on the model) samples these weights now."""
        args = {"model_id": self.model_id, "sampling_session_seq_id": INFLIGHT_SEQ, "kind": "inflight"}
        future = ops.submit_training(self.st, self.owner, self.model_id, self._seq(), "save_weights_for_sampler", args)
        return (await result(self.st, future["request_id"]))["sampling_session_id"]

    async def save_sampler_weights(self, name: str) -> str:
        """A named sampler checkpoint of the current weights (a snapshot on demand); its tinker:// path."""
        args = {"model_id": self.model_id, "path": name}
        future = ops.submit_training(self.st, self.owner, self.model_id, self._seq(), "save_weights_for_sampler", args)
        return (await result(self.st, future["request_id"]))["path"]
