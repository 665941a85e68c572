"""The background learner: feedback the Store holds but no update has trained on becomes an update of its model.

One asyncio task on the server's event loop (`run_forever`, started with the app). It wakes when feedback
arrives (or every `TICK_SECONDS`), and for each ready online model with unlearned feedback runs one *update*:

1. the new feedback (at most `max_new` pieces, oldest first) becomes examples (`examples`);
2. up to `steps` optimizer steps, each on the new examples plus `replay` earlier pieces of feedback and
   `anchors_per_step` answers of the anchor set (the base model's own replies to general prompts), drawn afresh
   each step from (seed, update, step); a preference pair is weighted by the DPO rule against the model as it was
   when the update began (length-normalised log-ratios; `dpo_beta`), a rating weights its reply by the rating.
   The update stops early once the new corrections' reply NLL, as a step measures it before its update, is below
   `stop_nll` (a fact already learned is not trained further);
3. an inflight save (the next chat samples the new weights, no new client), then the retention probe: the mean
   reply NLL of the anchors trained on (`anchor_nll`) and of the held-out quarter never trained on
   (`probe_nll`);
4. only then is the feedback marked learned, with the update's number, and the update added to the model's
   history (the console's curve).

A crash at any point loses nothing: feedback not yet marked is learned again by the next process. Every request
goes through the run's ordinary queue (`driver`), so chats keep being answered between its steps. Knows the Store,
the driver and the examples; not HTTP, not torch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time

from tinkerd.control.online.driver import RunDriver
from tinkerd.control.online.examples import Example, feedback_examples, reply_logprob, reply_nll, with_weight
from tinkerd.control.online.probe import anchor_examples, retention
from tinkerd.control.online.models import HISTORY_KEPT, resume_all
from tinkerd.control.plane import ControlPlane

log = logging.getLogger("tinkerd.online")
TICK_SECONDS = 2.0
HEARTBEAT_SECONDS = 10.0  # the online sessions' heartbeat, so the session sweep never unloads their runs
RETRY_SECONDS = 30.0  # after a failed update, before the model is tried again


class OnlineLearner:
    def __init__(self, st: ControlPlane) -> None:
        self.st = st
        self.wake = asyncio.Event()
        self.paused = False  # tests hold learning back to see feedback stored but not learned
        self.updating: str | None = None  # the online model being updated now
        self.counters = {"updates": 0, "feedback_learned": 0, "failures": 0}
        self._drivers: dict[str, RunDriver] = {}
        self._failed_at: dict[str, float] = {}
        self._heartbeat = 0.0
        self.ready = asyncio.Event()  # set once the models of the previous process are resumed

    def poke(self) -> None:
        self.wake.set()

    async def run_forever(self) -> None:
        try:
            rebuilt = await resume_all(self.st)
            if rebuilt:
                log.info("%d online models were rebuilt from their feedback after the restart", rebuilt)
        finally:
            self.ready.set()
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), TICK_SECONDS)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - e.g. the Store briefly unreachable: try again next tick
                log.exception("online learner tick failed")

    async def tick(self) -> None:
        rows = self.st.store.online_models_in(("ready",))
        now = time.time()
        if now - self._heartbeat > HEARTBEAT_SECONDS:
            for row in rows:
                self.st.store.touch_session(row["session_id"])
            self._heartbeat = now
        if self.paused:
            return
        for row in rows:
            if now - self._failed_at.get(row["id"], 0.0) < RETRY_SECONDS:
                continue
            if self.st.store.feedback_counts(row["id"])["pending"]:
                await self.update_safely(row)

    async def update_safely(self, row: dict) -> None:
        self.updating = row["name"]
        try:
            await self.update(row)
            self._failed_at.pop(row["id"], None)
        except Exception as exc:  # noqa: BLE001 - recorded on the row; the feedback stays unlearned
            self.counters["failures"] += 1
            self._failed_at[row["id"]] = time.time()
            log.warning("update of online model %s failed (retried in %g s): %s", row["name"], RETRY_SECONDS, exc)
            if self.st.store.online_model(row["id"]) is not None:
                self.st.store.update_online_model(row["id"], error=f"last update failed: {exc}")
        finally:
            self.updating = None

    def _driver(self, row: dict) -> RunDriver:
        driver = self._drivers.get(row["id"])
        if driver is None or driver.model_id != row["model_id"]:
            driver = self._drivers[row["id"]] = RunDriver(self.st, row["owner"], row["model_id"])
        return driver

    async def update(self, row: dict) -> dict:
        st, settings = self.st, row["settings"]
        new = st.store.feedback(row["id"], learned=False, limit=settings["max_new"])
        if not new:
            return {}
        started = time.perf_counter()
        info = st.base_model(row["base_model"])
        tokenizer = await asyncio.to_thread(st.tokenizers.get, info.tokenizer_id)
        context = info.max_context_length

        def examples(fb: dict) -> list[Example]:
            return feedback_examples(tokenizer, fb["kind"], fb["feedback"], context)

        new_examples = [(fb["id"], e) for fb in new for e in examples(fb)]
        corrections = [i for i, (fb_id, _) in enumerate(new_examples)
                       if next(fb["kind"] for fb in new if fb["id"] == fb_id) == "correction"]
        learned = st.store.feedback(row["id"], learned=True)
        train_anchors, probe = anchor_examples(tokenizer, row["anchors"] or [], settings["anchor_weight"], context)
        driver = self._driver(row)
        update = row["updates"] + 1
        rng = random.Random(settings["seed"] * 1_000_003 + update)
        references: dict[tuple[str, str], float] = {}
        metrics: dict = {}
        steps = 0
        for steps in range(1, settings["steps"] + 1):
            replayed = [(fb["id"], e) for fb in rng.sample(learned, min(settings["replay"], len(learned)))
                        for e in examples(fb)]
            anchor_batch = rng.sample(train_anchors, min(settings["anchors_per_step"], len(train_anchors)))
            batch = await self._weighted(driver, new_examples + replayed, references, settings["dpo_beta"])
            out = await driver.train_step(batch + [a.datum for a in anchor_batch], settings["learning_rate"])
            metrics = out["metrics"]
            if corrections and settings["stop_nll"] > 0:  # the new corrections, as the step found them
                nll = reply_nll([new_examples[i][1] for i in corrections],
                                [out["loss_fn_outputs"][i]["logprobs"]["data"] for i in corrections])
                if nll < settings["stop_nll"]:
                    break
        await driver.publish()
        seconds = time.perf_counter() - started  # the chat sees the update from here on
        point = {"update": update, "time": time.time(), "seconds": round(seconds, 3), "feedback": len(new),
                 "steps": steps, "learned_total": len(learned) + len(new), "loss": metrics.get("loss:sum"),
                 **await retention(driver, train_anchors, probe)}
        if st.store.online_model(row["id"]) is None:  # deleted while it learned
            return point
        history = ((row["history"] or []) + [point])[-HISTORY_KEPT:]
        st.store.update_online_model(row["id"], updates=update, last_update=point["time"], history=history,
                                     error=None)
        st.store.mark_feedback_learned([fb["id"] for fb in new], update)
        self.counters["updates"] += 1
        self.counters["feedback_learned"] += len(new)
        log.info("online model %s: update %d learned %d pieces of feedback in %.1f s (probe NLL %s)", row["name"],
                 update, len(new), seconds, point["probe_nll"])
        return point

    async def _weighted(self, driver: RunDriver, items: list[tuple[str, Example]],
                        references: dict[tuple[str, str], float], beta: float) -> list:
        """The step's datums: SFT and rated replies as they are; each preference pair (chosen then rejected, in
        order) scaled by beta * sigmoid(-margin), where the margin compares the pair's length-normalised logprobs
        now and at the update's first step (its reference). One forward pass measures every pair of the step."""
        pairs = [i for i, (_, e) in enumerate(items) if e.role == "chosen"]
        scale: dict[int, float] = {}
        if pairs:
            measured = [items[i][1] for i in pairs] + [items[i + 1][1] for i in pairs]
            logprobs = await driver.forward([e.datum for e in measured])
            per_token = [reply_logprob(e, lp) / max(1, int(e.reply_positions.sum()))
                         for e, lp in zip(measured, logprobs)]
            for k, i in enumerate(pairs):
                key = items[i][0]
                chosen, rejected = per_token[k], per_token[k + len(pairs)]
                ref_c = references.setdefault((key, "chosen"), chosen)
                ref_r = references.setdefault((key, "rejected"), rejected)
                margin = beta * ((chosen - ref_c) - (rejected - ref_r))
                scale[i] = beta / (1.0 + math.exp(margin))  # beta * sigmoid(-margin)
        out = []
        for i, (_, example) in enumerate(items):
            if example.role == "chosen":
                out.append(with_weight(example, scale[i]))
            elif example.role == "rejected":
                out.append(with_weight(example, -scale[i - 1]))
            else:
                out.append(example.datum)
        return out
