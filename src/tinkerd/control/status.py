"""What state a session or training run is in, as the console lists it.

- session: `finished` (the client closed it), `active` (a heartbeat or request within the session
  timeout), else `lapsed`.
- run: `parked` (its state waits on disk for the next request, `lifecycle`), `finished` (its session
  finished, or the run was released), `active` (loaded in the engine), else `lapsed` (unloaded: its
  session timed out, or the server restarted without parking it).

Reads the Store rows and the control plane's bookkeeping; changes nothing.
"""

from __future__ import annotations

import time

from tinkerd.control.lifecycle import FINISHED
from tinkerd.control.plane import ControlPlane

ACTIVE, LAPSED, PARKED = "active", "lapsed", "parked"
STATUSES = (ACTIVE, FINISHED, LAPSED, PARKED)


def session_status(st: ControlPlane, session: dict, now: float | None = None) -> str:
    if session["finished"]:
        return FINISHED
    now = time.time() if now is None else now
    return ACTIVE if now - session["last_seen"] < st.config.session_timeout_seconds else LAPSED


def run_status(st: ControlPlane, model_id: str, session: dict | None) -> str:
    if model_id in st.runs.parked:
        return PARKED
    if (session is not None and session["finished"]) or st.runs.released.get(model_id) == FINISHED:
        return FINISHED
    return ACTIVE if model_id in st.scheduler.models else LAPSED


def in_flight_samples(st: ControlPlane, session_id: str) -> int:
    """Sample requests of this session's sampling clients that are still decoding."""
    return sum(1 for pending in st.scheduler.samples.values() if pending.session_id == session_id)
