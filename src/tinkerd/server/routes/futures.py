"""`retrieve_future`: long-poll a request's result (protobuf when the client accepts it).

A sample request that a crashed server process never finished is *lost*: 410, which makes the SDK
send it again (sampling changes nothing, so running it twice is safe). Lost training requests are
never resent this way; the journal answers them or they fail with a `server` error."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from tinkerd.server.responses import FiniteJSONResponse

from tinkerd.protocol.requests import RetrieveFutureRequest
from tinkerd.control.plane import ControlPlane
from tinkerd.server.auth import caller
from tinkerd.server.deps import plane

router = APIRouter(prefix="/api/v1")
PROTOBUF = "application/x-protobuf"


@router.post("/retrieve_future")
async def retrieve_future(body: RetrieveFutureRequest, request: Request, owner: str = Depends(caller),
                          st: ControlPlane = Depends(plane)):
    st.owned(st.store.future(body.request_id), owner, "request_id", body.request_id)
    row = await st.board.wait(body.request_id, st.config.long_poll_seconds)
    if row is None:
        state, reason = st.admission.queue_state(body.request_id)
        return {"type": "try_again", "request_id": body.request_id, "queue_state": state,
                **({"queue_state_reason": reason} if reason else {})}
    if row["state"] == "lost":
        return JSONResponse({"detail": row["error"]}, status_code=410)
    if row["state"] == "error":
        return {"error": row["error"], "category": row["category"]}
    if row["result_pb"] is not None and (PROTOBUF in request.headers.get("accept", "") or row["result_json"] is None):
        return Response(content=row["result_pb"], media_type=PROTOBUF)
    return FiniteJSONResponse(row["result_json"])
