"""Every training operation a run can be asked for, as a replayable job, and how it is submitted.

A route validates a request, then calls `submit_training` (ordered by the run's seq_id),
`create_run` (the request that creates a run, at seq_id 0) or `queue_forward_backward`. Each kind
of request has a builder registered here with `replayable`, which turns its journal entry (`Op`:
JSON arguments plus, for forward passes, the protobuf call) into a scheduler `Job`; the same
builder serves the live request and its replay after a crash (`recovery`), so importing this module
registers every kind. Kinds: create_model, load_weights, forward, forward_backward, optim_step,
save_weights_for_sampler, save_weights, save_weights_external.

Knows the Store rows a job writes, checkpoint folders (`datadir`) and the run lifecycle; not HTTP,
not the wire format beyond the codecs it calls, not torch.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tinkerd.control import audit, curves, custom_losses, journal, lifecycle
from tinkerd.control.checkpoints import checkpoint_files
from tinkerd.control.plane import ControlPlane, NotFound
from tinkerd.control.scheduler import Job, Outcome
from tinkerd.engine.interface import AdapterSpec
from tinkerd.protocol.forward_backward import (
    decode_forward_backward_pb,
    encode_forward_backward_call_pb,
    encode_forward_backward_pb,
    forward_backward_to_json,
)
from tinkerd.protocol.numbers import INT64_MAX
from tinkerd.protocol.paths import run_id, sampler_id, tinker_path
from tinkerd.protocol.requests import (
    CreateModelRequest,
    LoraConfig,
    SaveWeightsExternalRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
)
from tinkerd.protocol.types import AdamParams, BadRequest, ForwardBackwardCall


log = logging.getLogger(__name__)


@dataclass
class Op:
    """One journaled request, as the route received it (or as the journal gave it back)."""

    st: ControlPlane
    owner: str
    model_id: str
    seq_id: int | None
    args: dict[str, Any]
    body: bytes = b""
    call: ForwardBackwardCall | None = None  # a forward pass the route already decoded (else: from `body`)


@dataclass
class Replayable:
    build: Callable[[Op], dict]  # the Job's fields: run=..., or call=... and encode=...
    changes_state: Callable[[dict], bool]  # whether a finished request must run again to rebuild the run


KINDS: dict[str, Replayable] = {}
REFUSED = "refused"  # the kind of a future holding the place of a request refused at submit (`hold_refused_place`)


def replayable(kind: str, changes_state: bool | Callable[[dict], bool] = True):
    """Registers how a journaled request of `kind` becomes a scheduler job."""
    def register(build: Callable[[Op], dict]) -> Callable[[Op], dict]:
        KINDS[kind] = Replayable(build, changes_state if callable(changes_state) else (lambda args: changes_state))
        return build
    return register


def job_for(kind: str, op: Op, future_id: str | None) -> Job:
    """The scheduler job for a request; raises BadRequest (before anything is stored) for bad input."""
    job = Job(future_id, kind, **KINDS[kind].build(op))
    job.model_id, job.seq_id = op.model_id, op.seq_id
    return job


# submitting

def submit_training(st: ControlPlane, owner: str, model_id: str, seq_id: int | None, kind: str, args: dict,
                    body: bytes = b"", call: ForwardBackwardCall | None = None) -> dict:
    """Queue a training op in its model's seq_id order; a retried seq_id gets its existing future.

    `args` (JSON) and `body` are the request as the journal keeps it; `kind`'s registered builder
    turns them into the job. A run unloaded because its session finished answers 410; one unloaded
    because its session lapsed is restored first (see `lifecycle`)."""
    st.model(model_id, owner)
    if seq_id:
        existing = st.store.future_for_seq(model_id, seq_id)
        if existing is not None and existing["kind"] == REFUSED:
            raise BadRequest(existing["error"])  # sent again: refused again
        if existing is not None:
            return {"request_id": existing["id"], "model_id": model_id}
    lifecycle.before_training_request(st, model_id)
    if model_id not in st.scheduler.models:
        raise NotFound(f"model_id {model_id!r} is not loaded (the server restarted); load it from a checkpoint")
    with refusal_holds_its_place(st, owner, model_id, seq_id, kind):
        job = job_for(kind, Op(st, owner, model_id, seq_id or None, args, body, call), None)
    if not seq_id:
        journal.stop_journaling(st, model_id)
    job.future_id = st.board.create(owner, kind, model_id, seq_id or None, journal.entry(st, model_id, args, body))
    st.scheduler.submit_ordered(model_id, seq_id, job)
    return {"request_id": job.future_id, "model_id": model_id}


def hold_refused_place(st: ControlPlane, owner: str, model_id: str, seq_id: int | None, kind: str,
                       error: str) -> None:
    """A request refused before it was queued (answered 4xx) still used its seq_id: the SDK numbers the next one
    after it. A failed future holds that place in the run's order, so the run's later requests do not wait for it
    forever, and the same seq_id sent again is refused again. Nothing happens for a model the caller does not
    own or that is not loaded, or a seq_id that is already taken. The held place is a future of kind `refused`
    with no journal entry: a replay after a crash skips it."""
    if not isinstance(seq_id, int) or not 0 < seq_id <= INT64_MAX:  # none, or not a seq_id the run can have
        return
    try:
        st.model(model_id, owner)
    except NotFound:
        return
    queue = st.scheduler.models.get(model_id)
    if queue is None or seq_id < queue.next_seq or seq_id in queue.waiting \
            or st.store.future_for_seq(model_id, seq_id) is not None:
        return
    future_id = st.board.create(owner, REFUSED, model_id, seq_id)
    st.board.fail(future_id, error, "user")
    log.info("refused %s seq_id %d of %s; its place in the order is held: %s", kind, seq_id, model_id, error)
    st.scheduler.submit_ordered(model_id, seq_id, Job(None, "refused", hold_place))


@contextlib.contextmanager
def refusal_holds_its_place(st: ControlPlane, owner: str, model_id: str, seq_id: int | None, kind: str):
    """Around a route's checks of an ordered request: if they refuse it (bad input, a checkpoint not found), its
    seq_id's place is held (`hold_refused_place`) and the refusal goes on to the client."""
    try:
        yield
    except (BadRequest, NotFound) as exc:
        hold_refused_place(st, owner, model_id, seq_id, kind, str(exc))
        raise


def hold_place() -> Outcome:
    """The run of a job that only holds a seq_id's place in a run's order (a refused request, a replay's skip)."""
    return Outcome()


def create_run(st: ControlPlane, owner: str, session: dict, model_seq_id: int, kind: str, args: dict) -> dict:
    """Queue the request that creates run `<session>:train:<model_seq_id>` (create_model, or load_weights into
    a new model) at seq_id 0; a retry gets the first request's future. New runs only in open sessions."""
    model_id = run_id(session["id"], model_seq_id)
    existing = st.store.future_for_seq(model_id, 0)
    if existing is not None:
        return {"request_id": existing["id"], "model_id": model_id}
    lifecycle.check_session_open(session)
    job = job_for(kind, Op(st, owner, model_id, None, args), None)
    job.future_id = st.board.create(owner, kind, model_id, 0, journal.entry(st, model_id, args))

    def start() -> None:  # now, or once the key is under --max-runs-per-key (`admission`)
        lifecycle.open_run(st, model_id, session["id"])
        st.scheduler.submit(job)

    st.admission.submit_run(owner, job.future_id, model_id, start)
    return {"request_id": job.future_id, "model_id": model_id}


def queue_forward_backward(st: ControlPlane, owner: str, call: ForwardBackwardCall) -> dict:
    """A forward or forward_backward pass; stable_reinforce data get the logprobs this server recorded when it
    sampled them (`sequence_records`), so the journal keeps the call exactly as it runs."""
    if call.loss_fn == "stable_reinforce":
        recorded = [st.sequences.sampler_logprobs(datum) for datum in call.data]
        if any(r is not None for r in recorded):  # every datum carries it, falling back to its own logprobs
            for datum, values in zip(call.data, recorded):
                fallback = datum.loss_inputs.get("logprobs")
                if values is not None or fallback is not None:
                    datum.loss_inputs["sampler_logprobs"] = values if values is not None else fallback
    kind = "forward" if call.forward_only else "forward_backward"
    body = encode_forward_backward_call_pb(call) if journal.enabled(st) else b""
    return submit_training(st, owner, call.model_id, call.seq_id, kind, {}, body, call)


# the builders

def _lora_config(spec: AdapterSpec) -> dict:
    return {"rank": spec.rank, "seed": spec.seed, "train_attn": spec.train_attn, "train_mlp": spec.train_mlp,
            "train_unembed": spec.train_unembed}


@replayable("create_model")
def _create_model_job(op: Op) -> dict:
    body = CreateModelRequest(**op.args)
    lora = body.lora_config or LoraConfig()
    spec = AdapterSpec(rank=lora.rank, seed=lora.seed, train_attn=lora.train_attn, train_mlp=lora.train_mlp,
                       train_unembed=lora.train_unembed)

    def run() -> Outcome:
        op.st.trainer.create_adapter(op.model_id, body.base_model, spec)
        if op.st.store.model(op.model_id) is None:  # else: replayed after a crash
            op.st.store.add_model(op.model_id, body.session_id, op.owner, body.base_model, lora.model_dump(),
                                  body.user_metadata)
            audit.record(op.st, op.owner, "training_run_create", op.model_id, base_model=body.base_model)
        return Outcome(json={"model_id": op.model_id, "type": "create_model"})

    return {"run": run}


@replayable("load_weights")
def _load_weights_job(op: Op) -> dict:
    """Into an existing model (in its seq_id order), or creating the model (seq_id 0) from the checkpoint."""
    st, args = op.st, op.args

    def run() -> Outcome:
        spec = st.trainer.load_state(op.model_id, args["base_model"], args["directory"], args["optimizer"])
        if st.store.model(op.model_id) is None:  # creating it (and not replaying after a crash)
            st.store.add_model(op.model_id, args["session_id"], op.owner, args["base_model"], _lora_config(spec),
                               args["user_metadata"])
            audit.record(st, op.owner, "training_run_create", op.model_id, base_model=args["base_model"],
                         source=args["path"])
        return Outcome(json={"path": args["path"], "model_id": op.model_id, "type": "load_weights"})

    return {"run": run}


@replayable("forward", changes_state=False)
@replayable("forward_backward")
def _forward_backward_job(op: Op) -> dict:
    """A `custom` loss is looked up again by its loss_id (stored, so a replay rebuilds the same loss)."""
    call = op.call or decode_forward_backward_pb(op.body)
    custom_losses.attach(op.st, op.owner, call)

    def encode(result) -> Outcome:  # on the engine thread, as the result comes back
        curves.record_forward_backward(op.st.store, op.owner, call, result)
        return Outcome(json=forward_backward_to_json(result), pb=encode_forward_backward_pb(result))

    return {"call": call, "encode": encode}


@replayable("optim_step")
def _optim_step_job(op: Op) -> dict:
    params = AdamParams(**op.args)

    def run() -> Outcome:
        started = time.perf_counter()
        metrics = op.st.trainer.optim_step(op.model_id, params)
        curves.record_optim_step(op.st.store, op.owner, op.model_id, op.seq_id, params.learning_rate,
                                 time.perf_counter() - started, metrics)
        journal.after_optim_step(op.st, op.model_id, op.seq_id)
        return Outcome(json={"type": "optim_step", "metrics": metrics})

    return {"run": run}


def _save_checkpoint(op: Op, kind: str, name: str, write: Callable[[Path], None], ttl_seconds: int | None,
                     user_metadata: dict | None = None) -> str:
    """On the engine thread: write the run's checkpoint `kind/name` into its folder, then record it (and its
    TTL) in the Store; returns its tinker:// path."""
    st = op.st
    path, directory = tinker_path(op.model_id, kind, name), st.paths.checkpoint(op.model_id, kind, name)
    write(directory)
    st.store.add_checkpoint(path, op.model_id, op.owner, kind, name, str(directory),
                            st.store.model(op.model_id)["base_model"], user_metadata=user_metadata)
    st.store.set_checkpoint_ttl(path, ttl_seconds)
    audit.record(st, op.owner, "checkpoint_create", op.model_id, path, kind=kind)
    return path


@replayable("save_weights_for_sampler", changes_state=lambda args: not args.get("path"))
def _save_weights_for_sampler_job(op: Op) -> dict:
    """A named checkpoint on disk, or for a sampling session (rebuilt by a replay) an in-memory snapshot
    (kind `snapshot`) or the run's shared inflight target (kind `inflight`, `Trainer.publish_inflight`)."""
    st, body = op.st, SaveWeightsForSamplerRequest(**op.args)
    if body.path:
        def run() -> Outcome:
            path = _save_checkpoint(op, "sampler_weights", body.path,
                                    lambda folder: st.trainer.save_sampler_weights(op.model_id, folder),
                                    body.ttl_seconds, body.user_metadata)
            return Outcome(json={"path": path, "type": "save_weights_for_sampler"})
    else:
        session_id = st.store.model(op.model_id)["session_id"]
        sampling_session = sampler_id(session_id, body.sampling_session_seq_id)
        inflight = body.kind == "inflight"

        def run() -> Outcome:
            if inflight:  # the run's shared target moves; every inflight session of the run samples it
                ref = st.trainer.publish_inflight(op.model_id)
                st.store.add_sampling_session(sampling_session, session_id, op.owner, ref.base_model, None, ref.uri,
                                              inflight_of=op.model_id)
                st.store.repoint_inflight_sessions(op.model_id, ref.uri)
            else:
                ref = st.trainer.snapshot_for_sampler(op.model_id)
                st.store.add_sampling_session(sampling_session, session_id, op.owner, ref.base_model, None, ref.uri)
            return Outcome(json={"sampling_session_id": sampling_session, "type": "save_weights_for_sampler"})

    return {"run": run}


@replayable("save_weights", changes_state=False)
def _save_weights_job(op: Op) -> dict:
    st, body = op.st, SaveWeightsRequest(**op.args)

    def run() -> Outcome:
        path = _save_checkpoint(op, "weights", body.path, lambda folder: st.trainer.save_state(op.model_id, folder),
                                body.ttl_seconds, body.user_metadata)
        return Outcome(json={"path": path, "type": "save_weights"})

    return {"run": run}


@replayable("save_weights_external", changes_state=False)
def _save_weights_external_job(op: Op) -> dict:
    st, body = op.st, SaveWeightsExternalRequest(**op.args)

    def run() -> Outcome:
        path = _save_checkpoint(op, "external_weights", body.path,
                                lambda folder: st.trainer.save_sampler_weights(op.model_id, folder), body.ttl_seconds)
        directory = st.paths.checkpoint(op.model_id, "external_weights", body.path)
        size = sum(f.stat().st_size for f in checkpoint_files(directory).values())
        return Outcome(json={"path": path, "size_bytes": size, "type": "save_weights_external"})

    return {"run": run}
