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
from tinkerd.server import journal, lifecycle
from tinkerd.server.auth import caller
from tinkerd.server.checkpoint_access import readable_checkpoint
from tinkerd.server.routes.training import CHECKPOINT_NAME, submit_creation, submit_training
from tinkerd.server.scheduler import Outcome
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
    st.model(body.model_id, owner)
    name = checkpoint_name(body.path)
    if st.store.checkpoint(f"tinker://{body.model_id}/weights/{name}") is not None and not body.overwrite:
        raise BadRequest(f"path: checkpoint tinker://{body.model_id}/weights/{name} already exists; "
                         "pass overwrite=True to replace it")
    return submit_training(st, owner, body.model_id, body.seq_id, "save_weights",
                           {**body.model_dump(mode="json"), "path": name})


@journal.replayable("save_weights", changes_state=False)
def _save_weights_job(op: journal.Op) -> dict:
    st, body = op.st, SaveWeightsRequest(**op.args)
    tinker_path = f"tinker://{op.model_id}/weights/{body.path}"
    directory = st.checkpoint_dir(op.model_id, "weights", body.path)

    def run() -> Outcome:
        st.trainer.save_state(op.model_id, directory)
        st.store.add_checkpoint(tinker_path, op.model_id, op.owner, "weights", body.path, str(directory),
                                st.store.model(op.model_id)["base_model"], user_metadata=body.user_metadata)
        st.store.set_checkpoint_ttl(tinker_path, body.ttl_seconds)
        return Outcome(json={"path": tinker_path, "type": "save_weights"})

    return {"run": run}


@router.post("/load_weights")
async def load_weights(body: LoadWeightsRequest, request: Request, owner: str = Depends(caller)):
    st: ServerState = request.app.state.tinkerd
    _, kind, _ = parse_tinker_path(body.path, "path")
    if kind != "weights" and body.optimizer:
        raise BadRequest(f"path: a {kind} checkpoint has no optimizer state; use a 'weights' (save_state) checkpoint")
    checkpoint = readable_checkpoint(st, owner, body.path)
    args = {"path": body.path, "optimizer": body.optimizer, "directory": checkpoint["directory"],
            "base_model": checkpoint["base_model"], "session_id": body.session_id, "user_metadata": body.user_metadata}
    if body.model_id:
        st.model(body.model_id, owner)
        return submit_training(st, owner, body.model_id, body.seq_id, "load_weights", args)
    if body.session_id is None or body.model_seq_id is None:
        raise BadRequest("load_weights needs model_id, or session_id and model_seq_id to create a model")
    session = st.session(body.session_id, owner)
    model_id = f"{session['id']}:train:{body.model_seq_id}"
    existing = st.store.future_for_seq(model_id, 0)
    if existing is not None:
        return {"request_id": existing["id"], "model_id": model_id}
    lifecycle.check_session_open(session)
    return submit_creation(st, owner, session["id"], model_id, "load_weights", args)


@journal.replayable("load_weights")
def _load_weights_job(op: journal.Op) -> dict:
    """Into an existing model (in its seq_id order), or creating the model (seq_id 0) from the checkpoint."""
    st, args = op.st, op.args

    def run() -> Outcome:
        spec = st.trainer.load_state(op.model_id, args["base_model"], args["directory"], args["optimizer"])
        if st.store.model(op.model_id) is None:  # creating it (and not replaying after a crash)
            lora = {"rank": spec.rank, "seed": spec.seed, "train_attn": spec.train_attn, "train_mlp": spec.train_mlp,
                    "train_unembed": spec.train_unembed}
            st.store.add_model(op.model_id, args["session_id"], op.owner, args["base_model"], lora,
                               args["user_metadata"])
        return Outcome(json={"path": args["path"], "model_id": op.model_id, "type": "load_weights"})

    return {"run": run}
