"""What the console's charts read: a run's recorded curves and a session's live metrics (`control.curves`).

- `GET /api/v1/training_runs/{run_id}/curves?after=CURSOR`: the steps recorded after the cursor, as
  columns per kind (forward_backward, optim_step, sample); the owner's runs only.
- `GET /api/v1/sessions/{session_id}/metrics`: in-flight sample requests and train / sample tokens/s
  over the last minute.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from tinkerd.control import curves, status
from tinkerd.control.plane import ControlPlane
from tinkerd.server.auth import caller
from tinkerd.server.deps import plane

router = APIRouter(prefix="/api/v1")


@router.get("/training_runs/{run_id}/curves")
def run_curves(run_id: str, after: int = 0, owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    st.model(run_id, owner)
    return JSONResponse(curves.run_curves(st.store, run_id, after))  # as is: FastAPI's encoder would walk 10,000 rows


@router.get("/sessions/{session_id}/metrics")
def session_metrics(session_id: str, owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    session = st.session(session_id, owner)
    return {"status": status.session_status(st, session), "in_flight_samples": status.in_flight_samples(st, session_id),
            **curves.session_rates(st.store, session_id)}
