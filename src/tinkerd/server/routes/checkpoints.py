"""Training-state checkpoints: save_weights (`save_state`) and load_weights, in both addressing modes.

`load_weights` with `model_id` overwrites an existing model in its seq_id order; with
`session_id` + `model_seq_id` it creates model `{session_id}:train:{model_seq_id}` from the
checkpoint (`create_training_client_from_state[_with_optimizer]`), which works after a restart.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from tinkerd.protocol.requests import LoadWeightsRequest, SaveWeightsRequest
from tinkerd.protocol.sample import parse_tinker_path
from tinkerd.protocol.types import BadRequest
from tinkerd.server import lifecycle
from tinkerd.server.auth import caller
from tinkerd.server.checkpoint_access import readable_checkpoint
from tinkerd.server.routes.training import CHECKPOINT_NAME, submit_training
from tinkerd.server.scheduler import Job, Outcome
from tinkerd.server.state import ServerState

router = APIRouter(prefix="/api/v1")


def checkpoint_name(path: str | None) -> str:
    name = path or time.strftime("ckpt-%Y%m%d-%H%M%S")
    if not CHECKPOINT_NAME.match(name):
        raise BadRequest(f"path: {name!r} is not a valid checkpoint name (letters, digits, '.', '_', '-')")
    return name


@router.post("/save_weights")
async def save_weights(body: SaveWeightsRequest, request: Request, owner: str = Depends(caller)):
    st: ServerState = request.app.state.tinkerd
    model = st.model(body.model_id, owner)
    name = checkpoint_name(body.path)
    tinker_path = f"tinker://{body.model_id}/weights/{name}"
    if st.store.checkpoint(tinker_path) is not None and not body.overwrite:
        raise BadRequest(f"path: checkpoint {tinker_path} already exists; pass overwrite=True to replace it")
    directory = st.checkpoint_dir(body.model_id, "weights", name)

    def run() -> Outcome:
        st.trainer.save_state(body.model_id, directory)
        st.store.add_checkpoint(tinker_path, body.model_id, owner, "weights", name, str(directory), model["base_model"],
                                user_metadata=body.user_metadata)
        st.store.set_checkpoint_ttl(tinker_path, body.ttl_seconds)
        return Outcome(json={"path": tinker_path, "type": "save_weights"})

    return submit_training(st, owner, body.model_id, body.seq_id, "save_weights", run)


@router.post("/load_weights")
async def load_weights(body: LoadWeightsRequest, request: Request, owner: str = Depends(caller)):
    st: ServerState = request.app.state.tinkerd
    _, kind, _ = parse_tinker_path(body.path, "path")
    if kind != "weights" and body.optimizer:
        raise BadRequest(f"path: a {kind} checkpoint has no optimizer state; use a 'weights' (save_state) checkpoint")
    checkpoint = readable_checkpoint(st, owner, body.path)
    directory, base_model = checkpoint["directory"], checkpoint["base_model"]
    if body.model_id:
        st.model(body.model_id, owner)

        def load_existing() -> Outcome:
            st.trainer.load_state(body.model_id, base_model, directory, body.optimizer)
            return Outcome(json={"path": body.path, "model_id": body.model_id, "type": "load_weights"})

        return submit_training(st, owner, body.model_id, body.seq_id, "load_weights", load_existing)
    if body.session_id is None or body.model_seq_id is None:
        raise BadRequest("load_weights needs model_id, or session_id and model_seq_id to create a model")
    session = st.session(body.session_id, owner)
    model_id = f"{session['id']}:train:{body.model_seq_id}"
    existing = st.store.future_for_seq(model_id, 0)
    if existing is not None:
        return {"request_id": existing["id"], "model_id": model_id}
    lifecycle.check_session_open(session)

    def create_from_state() -> Outcome:
        spec = st.trainer.load_state(model_id, base_model, directory, body.optimizer)
        lora = {"rank": spec.rank, "seed": spec.seed, "train_attn": spec.train_attn, "train_mlp": spec.train_mlp,
                "train_unembed": spec.train_unembed}
        st.store.add_model(model_id, session["id"], owner, base_model, lora, body.user_metadata)
        return Outcome(json={"path": body.path, "model_id": model_id, "type": "load_weights"})

    future_id = st.board.create(owner, "load_weights", model_id, 0)
    lifecycle.open_run(st, model_id, session["id"])
    st.scheduler.submit(Job(future_id, "load_weights", create_from_state))
    return {"request_id": future_id, "model_id": model_id}
