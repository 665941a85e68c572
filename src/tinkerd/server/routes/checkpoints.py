"""Checkpoint routes that write: save_weights (`save_state`), load_weights, save_weights_external, copy_weights.

`load_weights` with `model_id` overwrites an existing model in its seq_id order; with `session_id` +
`model_seq_id` it creates model `{session_id}:train:{model_seq_id}` from the checkpoint
(`create_training_client_from_state[_with_optimizer]`), which works after a restart.
`save_weights_external` saves the adapter as a standard PEFT folder (checkpoint kind
`external_weights`); age encryption is not supported (a request with recipients gets a 400).
`copy_weights` copies a readable checkpoint into one of the caller's (`control.checkpoints`);
`destination_project_id` is accepted and ignored (tinkerd has no projects), and the SDK's
`X-Idempotency-Key` makes a retried copy return the first copy's path.
Listing, deleting, publishing and TTLs are `rest`; download links are `downloads`.
"""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Depends, Request

from tinkerd.control import ops
from tinkerd.control.checkpoints import (
    KINDS,
    RememberedCopies,
    check_ttl,
    checkpoint_name,
    copy_checkpoint,
    readable_checkpoint,
)
from tinkerd.control.plane import ControlPlane
from tinkerd.protocol.paths import parse_tinker_path, tinker_path
from tinkerd.protocol.requests import CopyWeightsRequest, LoadWeightsRequest, SaveWeightsExternalRequest, SaveWeightsRequest
from tinkerd.protocol.types import BadRequest
from tinkerd.server.auth import caller
from tinkerd.server.deps import plane, remembered_copies

router = APIRouter(prefix="/api/v1")


@router.post("/save_weights")
async def save_weights(body: SaveWeightsRequest, owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    st.model(body.model_id, owner)
    with ops.refusal_holds_its_place(st, owner, body.model_id, body.seq_id, "save_weights"):
        name = checkpoint_name(body.path)
        path = tinker_path(body.model_id, "weights", name)
        if st.store.checkpoint(path) is not None and not body.overwrite:
            raise BadRequest(f"path: checkpoint {path} already exists; pass overwrite=True to replace it")
    return ops.submit_training(st, owner, body.model_id, body.seq_id, "save_weights",
                               {**body.model_dump(mode="json"), "path": name})


@router.post("/load_weights")
async def load_weights(body: LoadWeightsRequest, owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    with ops.refusal_holds_its_place(st, owner, body.model_id, body.seq_id, "load_weights") if body.model_id \
            else contextlib.nullcontext():
        _, kind, _ = parse_tinker_path(body.path, "path")
        if kind != "weights" and body.optimizer:
            raise BadRequest(f"path: a {kind} checkpoint has no optimizer state; use a 'weights' (save_state) checkpoint")
        checkpoint = readable_checkpoint(st, owner, body.path)
    args = {"path": body.path, "optimizer": body.optimizer, "directory": checkpoint["directory"],
            "base_model": checkpoint["base_model"], "session_id": body.session_id, "user_metadata": body.user_metadata}
    if body.model_id:
        st.model(body.model_id, owner)
        return ops.submit_training(st, owner, body.model_id, body.seq_id, "load_weights", args)
    if body.session_id is None or body.model_seq_id is None:
        raise BadRequest("load_weights needs model_id, or session_id and model_seq_id to create a model")
    session = st.session(body.session_id, owner)
    return ops.create_run(st, owner, session, body.model_seq_id, "load_weights", args)


@router.post("/save_weights_external")
async def save_weights_external(body: SaveWeightsExternalRequest, owner: str = Depends(caller),
                                st: ControlPlane = Depends(plane)):
    st.model(body.model_id, owner)
    with ops.refusal_holds_its_place(st, owner, body.model_id, body.seq_id, "save_weights_external"):
        if body.age_encryption_recipients:
            raise BadRequest("age_encryption_recipients: age encryption is not supported by this tinkerd server; "
                             "save without recipients (the download links are unguessable and expire in 1 hour)")
        if not body.path:
            raise BadRequest("path: a name for the external weights is required")
        name = checkpoint_name(body.path)
        check_ttl(body.ttl_seconds)
    return ops.submit_training(st, owner, body.model_id, body.seq_id, "save_weights_external",
                               {**body.model_dump(mode="json"), "path": name})


@router.post("/copy_weights")
def copy_weights(body: CopyWeightsRequest, request: Request, owner: str = Depends(caller),
                 st: ControlPlane = Depends(plane), copies: RememberedCopies = Depends(remembered_copies)):
    """Plain `def`: the copy is blocking disk work, run in FastAPI's thread pool."""
    key = request.headers.get("x-idempotency-key")
    previous = copies.copied(owner, key)
    if previous is not None and st.store.checkpoint(previous) is not None:
        return {"tinker_path": previous}
    _, kind, _ = parse_tinker_path(body.source_path, "source_path")
    if kind not in KINDS:
        raise BadRequest(f"source_path: unknown checkpoint kind {kind!r}; expected one of {sorted(KINDS)}")
    check_ttl(body.ttl_seconds)
    source = readable_checkpoint(st, owner, body.source_path)
    path = copy_checkpoint(st, owner, source, body.session_id, body.model_seq_id, body.ttl_seconds)
    copies.remember(owner, key, path)
    return {"tinker_path": path}
