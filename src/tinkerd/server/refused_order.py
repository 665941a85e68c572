"""An ordered training request whose body failed validation (a 422 before its route ran) still used its seq_id:
the SDK numbers the run's next request after it. This hands such a refusal to `control.ops.hold_refused_place`,
so the run's later requests do not wait for that seq_id forever. Knows which paths are ordered; not the checks.
"""

from __future__ import annotations

from fastapi import HTTPException, Request

from tinkerd.control import ops
from tinkerd.server.auth import caller

ORDERED_KINDS = {f"/api/v1/{kind}": kind for kind in (
    "optim_step", "save_weights_for_sampler", "save_weights", "load_weights", "save_weights_external")}


async def hold_place_of_invalid_body(request: Request, body: object, error: str) -> None:
    kind = ORDERED_KINDS.get(request.url.path)
    if kind is None or not isinstance(body, dict):
        return
    model_id, seq_id = body.get("model_id"), body.get("seq_id")
    if not isinstance(model_id, str) or type(seq_id) is not int:
        return
    st = request.app.state.tinkerd
    try:
        owner = await caller(request, request.headers.get("x-api-key"), st)
    except HTTPException:
        return
    ops.hold_refused_place(st, owner, model_id, seq_id, kind, error)
