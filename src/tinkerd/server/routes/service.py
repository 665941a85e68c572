"""Bootstrap and session routes: client config, sessions, heartbeat, telemetry, health, capabilities."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from tinkerd.control import lifecycle
from tinkerd.control.plane import ControlPlane
from tinkerd.protocol.requests import CreateSessionRequest, SessionRequest
from tinkerd.server.auth import caller
from tinkerd.server.deps import plane

router = APIRouter(prefix="/api/v1")


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.post("/client/config")
async def client_config(owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    # Keys exchanged for short-lived tokens unless --no-token-auth (`server.identity`: whoami reads them);
    # forward_backward bodies uncompressed (loopback and LAN do not need zstd); custom losses uploaded once
    # and run in one forward_backward here (`control.custom_losses`).
    return {"pjwt_auth_enabled": st.config.token_auth, "proto_compress_fwdbwd": False,
            "custom_loss_server_side": True}


@router.post("/client/dynamic_config")
async def dynamic_config(owner: str = Depends(caller)):
    # Abandoned sample polls are cancelled (POST /cancel_future), which frees their decode rows.
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": True, "sample_cancel_max_batch_size": 64}


@router.get("/get_server_capabilities")
async def capabilities(owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    models = [
        {"model_name": m.name, "max_context_length": m.max_context_length, "trainable": True, "sampleable": True}
        for m in st.base_models.values()
    ]
    return {"supported_models": models}


@router.post("/create_session")
async def create_session(body: CreateSessionRequest, owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    session_id = f"s-{uuid.uuid4().hex[:16]}"
    st.store.add_session(session_id, owner, body.sdk_version, body.tags, body.user_metadata or {})
    return {"type": "create_session", "session_id": session_id}


@router.post("/session_heartbeat")
async def heartbeat(body: SessionRequest, owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    session = st.session(body.session_id, owner)
    if session["finished"]:
        return JSONResponse({"detail": "session finished"}, status_code=410)
    st.store.touch_session(body.session_id)
    return {}


@router.post("/sessions/{session_id}/finish")
async def finish_session(session_id: str, owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    """The session's training runs are unloaded (after the work already queued for them)."""
    st.session(session_id, owner)
    st.store.finish_session(session_id)
    lifecycle.release_session(st, session_id)
    return {}


@router.post("/telemetry")
async def telemetry(owner: str = Depends(caller)):
    return {"status": "accepted"}
