"""Training routes: create_model, get_info, forward_backward (and the old JSON forward),
optim_step and save_weights_for_sampler. Training operations are futures run in seq_id order."""

from __future__ import annotations

import re
from fastapi import APIRouter, Depends, Request

from tinkerd.engine.interface import AdapterSpec
from tinkerd.protocol.forward_backward import (
    decode_forward_backward_json,
    decode_forward_backward_pb,
    decompress_body,
    encode_forward_backward_call_pb,
    encode_forward_backward_pb,
    forward_backward_to_json,
)
from tinkerd.protocol.requests import CreateModelRequest, LoraConfig, ModelRequest, OptimStepRequest, SaveWeightsForSamplerRequest
from tinkerd.protocol.types import AdamParams, BadRequest, ForwardBackwardCall
from tinkerd.server import journal, lifecycle
from tinkerd.server.auth import caller
from tinkerd.server.scheduler import Outcome
from tinkerd.server.state import NotFound, ServerState

router = APIRouter(prefix="/api/v1")
CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def submit_training(st: ServerState, owner: str, model_id: str, seq_id: int | None, kind: str, args: dict,
                    body: bytes = b"", call: ForwardBackwardCall | None = None) -> dict:
    """Queue a training op in its model's seq_id order; a retried seq_id gets its existing future.

    `args` (JSON) and `body` are the request as the journal keeps it; `kind`'s registered builder
    turns them into the job (see `journal`). A run unloaded because its session finished answers
    410; one unloaded because its session lapsed is restored first (see `lifecycle`)."""
    st.model(model_id, owner)
    if seq_id:
        existing = st.store.future_for_seq(model_id, seq_id)
        if existing is not None:
            return {"request_id": existing["id"], "model_id": model_id}
    lifecycle.before_training_request(st, model_id)
    if model_id not in st.scheduler.models:
        raise NotFound(f"model_id {model_id!r} is not loaded (the server restarted); load it from a checkpoint")
    job = journal.job_for(kind, journal.Op(st, owner, model_id, seq_id or None, args, body, call), None)
    if not seq_id:
        journal.stop_journaling(st, model_id)
    job.future_id = st.board.create(owner, kind, model_id, seq_id or None, journal.entry(st, model_id, args, body))
    st.scheduler.submit_ordered(model_id, seq_id, job)
    return {"request_id": job.future_id, "model_id": model_id}


@router.post("/create_model")
async def create_model(body: CreateModelRequest, request: Request, owner: str = Depends(caller)):
    st: ServerState = request.app.state.tinkerd
    session = st.session(body.session_id, owner)
    st.base_model(body.base_model)
    model_id = f"{session['id']}:train:{body.model_seq_id}"
    existing = st.store.future_for_seq(model_id, 0)
    if existing is not None:
        return {"request_id": existing["id"], "model_id": model_id}
    lifecycle.check_session_open(session)
    return submit_creation(st, owner, session["id"], model_id, "create_model", body.model_dump(mode="json"))


def submit_creation(st: ServerState, owner: str, session_id: str, model_id: str, kind: str, args: dict) -> dict:
    """Queue the request that creates a run (create_model, or load_weights into a new model): seq_id 0."""
    job = journal.job_for(kind, journal.Op(st, owner, model_id, None, args), None)
    job.future_id = st.board.create(owner, kind, model_id, 0, journal.entry(st, model_id, args))
    lifecycle.open_run(st, model_id, session_id)
    st.scheduler.submit(job)
    return {"request_id": job.future_id, "model_id": model_id}


@journal.replayable("create_model")
def _create_model_job(op: journal.Op) -> dict:
    body = CreateModelRequest(**op.args)
    lora = body.lora_config or LoraConfig()
    spec = AdapterSpec(rank=lora.rank, seed=lora.seed, train_attn=lora.train_attn, train_mlp=lora.train_mlp,
                       train_unembed=lora.train_unembed)

    def run() -> Outcome:
        op.st.trainer.create_adapter(op.model_id, body.base_model, spec)
        if op.st.store.model(op.model_id) is None:  # else: replayed after a crash
            op.st.store.add_model(op.model_id, body.session_id, op.owner, body.base_model, lora.model_dump(),
                                  body.user_metadata)
        return Outcome(json={"model_id": op.model_id, "type": "create_model"})

    return {"run": run}


@router.post("/get_info")
async def get_info(body: ModelRequest, request: Request, owner: str = Depends(caller)):
    st: ServerState = request.app.state.tinkerd
    model = st.model(body.model_id, owner)
    info = st.base_model(model["base_model"])
    return {
        "type": "get_info",
        "model_id": model["id"],
        "model_data": {"arch": info.arch, "model_name": info.name, "tokenizer_id": info.tokenizer_id},
        "is_lora": True,
        "lora_rank": model["lora_config"]["rank"],
        "model_name": info.name,
    }


def _encode(result) -> Outcome:
    return Outcome(json=forward_backward_to_json(result), pb=encode_forward_backward_pb(result))


def _queue_forward_backward(st: ServerState, owner: str, call: ForwardBackwardCall) -> dict:
    if call.loss_fn == "stable_reinforce":
        recorded = [st.sequences.sampler_logprobs(datum) for datum in call.data]
        if any(r is not None for r in recorded):  # every datum carries it, falling back to its own logprobs
            for datum, values in zip(call.data, recorded):
                fallback = datum.loss_inputs.get("logprobs")
                if values is not None or fallback is not None:
                    datum.loss_inputs["sampler_logprobs"] = values if values is not None else fallback
    kind = "forward" if call.forward_only else "forward_backward"
    body = encode_forward_backward_call_pb(call) if journal.enabled(st) else b""  # the call as run, recorded logprobs too
    return submit_training(st, owner, call.model_id, call.seq_id, kind, {}, body, call)


@journal.replayable("forward", changes_state=False)
@journal.replayable("forward_backward")
def _forward_backward_job(op: journal.Op) -> dict:
    return {"call": op.call or decode_forward_backward_pb(op.body), "encode": _encode}


async def _read_body(request: Request, st: ServerState) -> bytes:
    body = await request.body()
    if len(body) > st.config.max_body_bytes:
        raise BadRequest(f"body: {len(body)} bytes exceeds the server's limit of {st.config.max_body_bytes}")
    return decompress_body(body, request.headers.get("content-encoding"))


@router.post("/forward_backward")
async def forward_backward(request: Request, owner: str = Depends(caller)):
    st: ServerState = request.app.state.tinkerd
    body = await _read_body(request, st)
    if "json" in request.headers.get("content-type", ""):
        call = decode_forward_backward_json(_json(body))
    else:
        call = decode_forward_backward_pb(body)
    return _queue_forward_backward(st, owner, call)


@router.post("/forward")
async def forward(request: Request, owner: str = Depends(caller)):
    """Forward-only passes as older SDKs (< 0.22.3) send them: JSON to /forward."""
    st: ServerState = request.app.state.tinkerd
    return _queue_forward_backward(st, owner, decode_forward_backward_json(_json(await _read_body(request, st)), True))


def _json(body: bytes) -> dict:
    import json

    try:
        return json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"body: invalid JSON: {exc}") from exc


@router.post("/optim_step")
async def optim_step(body: OptimStepRequest, request: Request, owner: str = Depends(caller)):
    st: ServerState = request.app.state.tinkerd
    args = body.adam_params.model_dump(mode="json", exclude={"type"}, exclude_none=True)
    return submit_training(st, owner, body.model_id, body.seq_id, "optim_step", args)


@journal.replayable("optim_step")
def _optim_step_job(op: journal.Op) -> dict:
    params = AdamParams(**op.args)

    def run() -> Outcome:
        metrics = op.st.trainer.optim_step(op.model_id, params)
        journal.after_optim_step(op.st, op.model_id, op.seq_id)
        return Outcome(json={"type": "optim_step", "metrics": metrics})

    return {"run": run}


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(body: SaveWeightsForSamplerRequest, request: Request, owner: str = Depends(caller)):
    st: ServerState = request.app.state.tinkerd
    st.model(body.model_id, owner)
    if body.path and not CHECKPOINT_NAME.match(body.path):
        raise BadRequest(f"path: {body.path!r} is not a valid checkpoint name (letters, digits, '.', '_', '-')")
    if not body.path and body.sampling_session_seq_id is None:
        raise BadRequest("save_weights_for_sampler needs either path or sampling_session_seq_id")
    return submit_training(st, owner, body.model_id, body.seq_id, "save_weights_for_sampler", body.model_dump(mode="json"))


@journal.replayable("save_weights_for_sampler", changes_state=lambda args: not args.get("path"))
def _save_weights_for_sampler_job(op: journal.Op) -> dict:
    """A named checkpoint on disk, or an in-memory snapshot for a sampling session (which a replay rebuilds)."""
    st, body = op.st, SaveWeightsForSamplerRequest(**op.args)
    model = st.store.model(op.model_id)
    if body.path:
        tinker_path = f"tinker://{op.model_id}/sampler_weights/{body.path}"
        directory = st.checkpoint_dir(op.model_id, "sampler_weights", body.path)

        def run() -> Outcome:
            st.trainer.save_sampler_weights(op.model_id, directory)
            st.store.add_checkpoint(tinker_path, op.model_id, op.owner, "sampler_weights", body.path, str(directory),
                                    model["base_model"], user_metadata=body.user_metadata)
            st.store.set_checkpoint_ttl(tinker_path, body.ttl_seconds)
            return Outcome(json={"path": tinker_path, "type": "save_weights_for_sampler"})
    else:
        sampler_id = f"{model['session_id']}:sample:{body.sampling_session_seq_id}"

        def run() -> Outcome:
            ref = st.trainer.snapshot_for_sampler(op.model_id)
            st.store.add_sampling_session(sampler_id, model["session_id"], op.owner, ref.base_model, None, ref.uri)
            return Outcome(json={"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"})

    return {"run": run}
