"""POST /api/v1/create_custom_loss: store a session's traced loss graph (validated as data) and answer
its loss_id as an already finished future, as the SDK expects (`control.custom_losses`)."""

from __future__ import annotations

from fastapi import APIRouter, Body, Depends

from tinkerd.control import custom_losses
from tinkerd.control.plane import ControlPlane
from tinkerd.server.auth import caller
from tinkerd.server.deps import plane

router = APIRouter(prefix="/api/v1")


@router.post("/create_custom_loss")
async def create_custom_loss(body: dict = Body(...), owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    loss_id = custom_losses.create(st, owner, body)
    future_id = st.board.create(owner, "create_custom_loss")
    st.board.complete(future_id, {"loss_id": loss_id, "type": "create_custom_loss"})
    return {"request_id": future_id}
