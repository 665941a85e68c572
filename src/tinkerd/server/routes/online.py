"""Online models over HTTP: create, list, read, delete, feed, snapshot. A caller sees only its own (404 otherwise).

Everything but the HTTP is `control.online`: the checks (`spec`), the model's life (`models`) and the learning
(`learner`, woken here when feedback arrives). Chat with an online model on `/v1/chat/completions` by its name.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from tinkerd.control.online import models
from tinkerd.control.online.driver import RunDriver
from tinkerd.control.online.learner import OnlineLearner
from tinkerd.control.checkpoints import checkpoint_name
from tinkerd.control.plane import ControlPlane
from tinkerd.protocol.types import BadRequest
from tinkerd.server.auth import caller
from tinkerd.server.deps import online_learner, plane

router = APIRouter(prefix="/api/v1")


async def _object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise BadRequest(f"body: invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("body: expected a JSON object")
    return body


@router.post("/online")
async def create(request: Request, owner: str = Depends(caller), st: ControlPlane = Depends(plane)) -> dict:
    return await models.create(st, owner, await _object(request))


@router.get("/online")
async def list_online(limit: int = 100, offset: int = 0, owner: str = Depends(caller),
                      st: ControlPlane = Depends(plane)) -> dict:
    rows, total = st.store.list_online_models(owner, max(1, min(limit, 1000)), max(0, offset))
    return {"online_models": [models.describe(st, r) for r in rows], "total": total}


@router.get("/online/{name}")
async def read(name: str, owner: str = Depends(caller), st: ControlPlane = Depends(plane)) -> dict:
    return models.describe(st, models.owned(st, owner, name))


@router.delete("/online/{name}")
async def delete(name: str, owner: str = Depends(caller), st: ControlPlane = Depends(plane)) -> dict:
    return models.delete(st, owner, name)


@router.post("/online/{name}/feedback")
async def feedback(name: str, request: Request, owner: str = Depends(caller), st: ControlPlane = Depends(plane),
                   learner: OnlineLearner = Depends(online_learner)) -> dict:
    stored = models.add_feedback(st, owner, name, await _object(request))  # committed: only now acknowledged
    learner.poke()
    return stored


@router.post("/online/{name}/snapshot")
async def snapshot(name: str, request: Request, owner: str = Depends(caller),
                   st: ControlPlane = Depends(plane)) -> dict:
    """A sampler checkpoint of the model's current weights (a tinker:// path for the SDK or the chat route)."""
    row = models.owned(st, owner, name)
    label = checkpoint_name((await _object(request)).get("name") if await request.body() else None)
    return {"path": await RunDriver(st, owner, row["model_id"]).save_sampler_weights(label)}
