"""An online model's life: created (a run, its anchor set, its first inflight save), read, fed, served, deleted,
and brought back after a restart.

An online model is a Store row owned by the caller's API key, plus an ordinary training run in a session of its
own, whose inflight sampling session is what the chat route and the SDK sample. A caller sees only its own
online models: any other name is "not found" (404), for reading, chatting and feeding alike.

After a restart, a run the journal rebuilt (`recovery`) or a graceful stop parked (`lifecycle`) carries on; a run
that could not be rebuilt (no journal) is created again from the base (or the source checkpoint) and all of the
model's feedback, which the Store keeps, is learned again. Knows the Store, `ops` (through `driver`) and the
checkpoint rules; not HTTP, not torch.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from tinkerd.control import lifecycle
from tinkerd.control.checkpoints import readable_checkpoint
from tinkerd.control.online.driver import RunDriver
from tinkerd.control.online.examples import ANCHOR_PROMPTS, PROBE_PROMPTS
from tinkerd.control.online.probe import anchor_examples, retention, split_anchors
from tinkerd.control.online.spec import parse_create, parse_feedback
from tinkerd.control.plane import ControlPlane, NotFound
from tinkerd.engine.interface import AdapterRef
from tinkerd.protocol.paths import parse_tinker_path, run_id
from tinkerd.protocol.types import BadRequest

log = logging.getLogger("tinkerd.online")
HISTORY_KEPT = 1000  # points of the retention curve kept in the row


def owned(st: ControlPlane, owner: str, name: str) -> dict:
    row = st.store.online_model_named(owner, name)
    if row is None:
        raise NotFound(f"online model {name!r} not found")
    return row


def describe(st: ControlPlane, row: dict) -> dict:
    """An online model as its owner reads it (`GET /api/v1/online/NAME`)."""
    history = row["history"] or []
    anchors, probe = split_anchors(row["anchors"] or [])
    return {"name": row["name"], "status": row["status"], "base_model": row["base_model"], "source": row["source"],
            "settings": row["settings"], "training_run_id": row["model_id"],
            "sampling_session_id": row["sampling_session_id"], "chat_model": row["name"],
            "feedback": st.store.feedback_counts(row["id"]), "updates": row["updates"],
            "last_update": row["last_update"], "anchors": len(anchors), "probe_prompts": len(probe),
            "retention": history, "error": row["error"], "created": row["created"]}


async def create(st: ControlPlane, owner: str, body: dict) -> dict:
    """Checks the request, then makes the run, samples the anchor set and publishes the first inflight weights."""
    name, base_model, source_path, settings = parse_create(body, sorted(st.base_models))
    source = None
    if source_path is not None:
        _, kind, _ = parse_tinker_path(source_path, "base_model")
        if kind not in ("weights", "sampler_weights"):
            raise BadRequest(f"base_model: cannot start from a {kind!r} checkpoint; use weights or sampler_weights")
        try:
            source = readable_checkpoint(st, owner, source_path)
        except NotFound:
            raise NotFound(f"base_model: checkpoint {source_path!r} not found") from None
        base_model = source["base_model"]
    st.base_model(base_model)
    if st.store.online_model_named(owner, name) is not None:
        raise BadRequest(f"name: you already have an online model named {name!r}")
    online_id = f"online-{uuid.uuid4().hex[:16]}"
    try:
        st.store.add_online_model(online_id, owner, name, base_model, source_path, settings)
    except Exception:  # noqa: BLE001 - the unique (owner, name) index: a concurrent create of the same name
        raise BadRequest(f"name: you already have an online model named {name!r}") from None
    row = st.store.online_model(online_id)
    try:
        row = await start_run(st, row)
        anchors = await sample_anchors(st, owner, source_path or base_model, settings)
        info = st.base_model(base_model)
        tokenizer = await asyncio.to_thread(st.tokenizers.get, info.tokenizer_id)
        trained, probe = anchor_examples(tokenizer, anchors, settings["anchor_weight"], info.max_context_length)
        start = {"update": 0, "time": time.time(), "feedback": 0, "learned_total": 0,
                 **await retention(RunDriver(st, owner, row["model_id"]), trained, probe)}
        st.store.update_online_model(online_id, anchors=anchors, status="ready", history=[start])
    except Exception as exc:
        st.store.update_online_model(online_id, status="failed", error=str(exc))
        raise
    log.info("online model %s (%s) ready: run %s", name, online_id, row["model_id"])
    return describe(st, st.store.online_model(online_id))


async def start_run(st: ControlPlane, row: dict) -> dict:
    """A new session and run for the online model, its weights published inflight; the row names them."""
    session_id = f"s-{uuid.uuid4().hex[:16]}"
    st.store.add_session(session_id, row["owner"], None, ["online"], {"online_model": row["name"]})
    model_id = run_id(session_id, 0)
    source = st.store.checkpoint(row["source"]) if row["source"] else None
    if row["source"] and source is None:
        raise NotFound(f"base_model: checkpoint {row['source']!r} no longer exists")
    driver = RunDriver(st, row["owner"], model_id)
    await driver.create(st.store.session(session_id), row["base_model"], row["settings"]["rank"],
                        row["settings"]["seed"], source, row["settings"].get("train_unembed", True))
    sampler = await driver.publish()
    st.store.update_online_model(row["id"], session_id=session_id, model_id=model_id, sampling_session_id=sampler)
    return st.store.online_model(row["id"])


async def sample_anchors(st: ControlPlane, owner: str, model: str, settings: dict) -> list[dict]:
    """The base model's (or source checkpoint's) own greedy answers to the first `anchors` general prompts (the
    anchor set) and to the first `probe_prompts` held-out ones (the probe, marked `probe`)."""
    from tinkerd.control.openai_service import chat_completion  # the chat route's own path to the sampler

    async def never_gone() -> None:
        await asyncio.Event().wait()

    prompts = ([(p, False) for p in ANCHOR_PROMPTS[:settings["anchors"]]]
               + [(p, True) for p in PROBE_PROMPTS[:settings["probe_prompts"]]])

    async def answer(prompt: str, probe: bool) -> dict:
        messages = [{"role": "user", "content": prompt}]
        body = {"model": model, "messages": messages, "max_tokens": settings["anchor_max_tokens"],
                "temperature": 0.0}
        reply = await chat_completion(st, owner, body, never_gone)
        choice = reply["choices"][0]
        return {"messages": messages, "reply": choice["message"]["content"],
                "complete": choice["finish_reason"] == "stop", "probe": probe}

    return list(await asyncio.gather(*(answer(p, probe) for p, probe in prompts)))


def add_feedback(st: ControlPlane, owner: str, name: str, body: dict) -> dict:
    """Stores the feedback (committed before this returns); the learner trains on it in the background."""
    row = owned(st, owner, name)
    kind, feedback = parse_feedback(body)
    if row["status"] not in ("ready", "creating"):
        raise BadRequest(f"name: online model {name!r} is {row['status']}: {row['error']}")
    feedback_id = f"fb-{uuid.uuid4().hex[:16]}"
    st.store.add_feedback(feedback_id, row["id"], kind, feedback)
    return {"id": feedback_id, "kind": kind, "status": "stored", "feedback": st.store.feedback_counts(row["id"])}


def delete(st: ControlPlane, owner: str, name: str) -> dict:
    """The run is unloaded and its session finished; the row and its feedback go (checkpoints stay)."""
    row = owned(st, owner, name)
    if row["model_id"] and row["model_id"] in st.runs.session_of:
        lifecycle.release(st, row["model_id"], lifecycle.FINISHED)
    if row["session_id"]:
        st.store.finish_session(row["session_id"])
    st.store.delete_online_model(row["id"])
    return {"name": name, "deleted": True}


def chat_adapter(st: ControlPlane, owner: str, name: str) -> AdapterRef | None:
    """What answers a chat naming one of the caller's online models (its newest inflight weights); None if the
    caller has no ready online model of that name."""
    row = st.store.online_model_named(owner, name)
    if row is None or row["status"] != "ready" or not row["sampling_session_id"]:
        return None
    session = st.store.sampling_session(row["sampling_session_id"])
    return None if session is None else AdapterRef(uri=session["adapter_uri"], base_model=session["base_model"])


async def resume_all(st: ControlPlane) -> int:
    """At start, after `recovery`: online models whose run was not rebuilt get a new run and relearn their
    feedback; models a crash caught while being created are marked failed. Returns how many were rebuilt."""
    for row in st.store.online_models_in(("creating",)):
        st.store.update_online_model(row["id"], status="failed",
                                     error="the server stopped while creating it; delete it and create it again")
    rebuilt = 0
    for row in st.store.online_models_in(("ready", "rebuilding")):
        if row["status"] == "ready" and row["model_id"] in st.scheduler.models:
            if row["model_id"] in st.runs.parked:  # parked by a graceful stop: back in memory, so chats work now
                lifecycle.before_training_request(st, row["model_id"])
            continue
        try:
            st.store.forget_learned_feedback(row["id"])
            history = (row["history"] or []) + [{"update": row["updates"], "time": time.time(), "rebuilt": True}]
            st.store.update_online_model(row["id"], status="rebuilding", history=history[-HISTORY_KEPT:])
            await start_run(st, row)
            st.store.update_online_model(row["id"], status="ready")
            rebuilt += 1
        except Exception as exc:  # noqa: BLE001 - one model's trouble must not stop the server
            log.exception("online model %s could not be rebuilt", row["name"])
            st.store.update_online_model(row["id"], status="failed", error=f"rebuilding after a restart: {exc}")
    return rebuilt
