"""Training routes: create_model, get_info, forward_backward (and the old JSON forward), optim_step and
save_weights_for_sampler. Each validates its request and hands it to `control.ops`, which runs training
operations as futures in seq_id order."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Request

from tinkerd.control import ops
from tinkerd.control.checkpoints import NAME
from tinkerd.control.plane import ControlPlane
from tinkerd.protocol.forward_backward import (UndecompressibleBody, decode_forward_backward_json,
                                              decode_forward_backward_pb, decompress_body, request_order)
from tinkerd.protocol.requests import CreateModelRequest, ModelRequest, OptimStepRequest, SaveWeightsForSamplerRequest
from tinkerd.protocol.types import BadRequest
from tinkerd.server.auth import caller
from tinkerd.server.deps import plane

router = APIRouter(prefix="/api/v1")


@router.post("/create_model")
async def create_model(body: CreateModelRequest, owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    session = st.session(body.session_id, owner)
    st.base_model(body.base_model)
    return ops.create_run(st, owner, session, body.model_seq_id, "create_model", body.model_dump(mode="json"))


@router.post("/get_info")
async def get_info(body: ModelRequest, owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
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


async def _read_body(request: Request, st: ControlPlane) -> bytes:
    body = await request.body()
    if len(body) > st.config.max_body_bytes:
        raise BadRequest(f"body: {len(body)} bytes exceeds the server's limit of {st.config.max_body_bytes}")
    return await asyncio.to_thread(decompress_body, body, request.headers.get("content-encoding"),
                                   st.config.max_decompressed_bytes)


def _json(body: bytes) -> dict:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"body: invalid JSON: {exc}") from exc


def _decode(st: ControlPlane, body: bytes, as_json: bool, forward_only: bool = False):
    """The call, every tensor checked against its datum's tokens, the served vocabulary and the size limit."""
    limits = {"max_width": max((m.vocab_size for m in st.base_models.values()), default=0) or None,
              "max_tensor_bytes": st.config.max_decompressed_bytes}
    if as_json:
        return decode_forward_backward_json(_json(body), forward_only, **limits)
    return decode_forward_backward_pb(body, **limits)


async def _queue(request: Request, st: ControlPlane, owner: str, as_json: bool, forward_only: bool, kind: str) -> dict:
    """Read, decode and queue a forward pass. A refused one still used its seq_id if its body names one
    (`ops.hold_refused_place`)."""
    body = b""
    try:
        body = await _read_body(request, st)
        call = await asyncio.to_thread(_decode, st, body, as_json, forward_only)
    except BadRequest as exc:
        order = request_order(exc.prefix if isinstance(exc, UndecompressibleBody) else body, as_json)
        if order is not None:
            ops.hold_refused_place(st, owner, *order, kind, str(exc))
        raise
    return ops.queue_forward_backward(st, owner, call)


@router.post("/forward_backward")
async def forward_backward(request: Request, owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    return await _queue(request, st, owner, "json" in request.headers.get("content-type", ""), False,
                        "forward_backward")


@router.post("/forward")
async def forward(request: Request, owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    """Forward-only passes as older SDKs (< 0.22.3) send them: JSON to /forward."""
    return await _queue(request, st, owner, True, True, "forward")


@router.post("/optim_step")
async def optim_step(body: OptimStepRequest, owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    args = body.adam_params.model_dump(exclude={"type"}, exclude_none=True)  # floats as sent: AdamParams checks them
    return ops.submit_training(st, owner, body.model_id, body.seq_id, "optim_step", args)


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(body: SaveWeightsForSamplerRequest, owner: str = Depends(caller),
                                   st: ControlPlane = Depends(plane)):
    st.model(body.model_id, owner)
    with ops.refusal_holds_its_place(st, owner, body.model_id, body.seq_id, "save_weights_for_sampler"):
        if body.path and not NAME.match(body.path):
            raise BadRequest(f"path: {body.path!r} is not a valid checkpoint name (letters, digits, '.', '_', '-')")
        if not body.path and body.sampling_session_seq_id is None:
            raise BadRequest("save_weights_for_sampler needs either path or sampling_session_seq_id")
    return ops.submit_training(st, owner, body.model_id, body.seq_id, "save_weights_for_sampler",
                               body.model_dump(mode="json"))
