"""What each console page shows, from the functions the SDK's REST routes run (so the same visibility rules)
plus the run and session states (`control.status`). Search, status filters and paging happen here.

Knows the REST JSON shapes; not HTML (the templates), not how the rows are stored.
"""

from __future__ import annotations

import json

from tinkerd.control import status
from tinkerd.control.online import models as online
from tinkerd.control.plane import ControlPlane, NotFound
from tinkerd.protocol.paths import owner_urn, session_of_run
from tinkerd.server.routes import rest

PAGE = 100
ALL = 1000  # the REST routes' largest page


def _matches(query: str, *texts) -> bool:
    """Every word of `query` is in one of `texts` (ids, base model, metadata as `key=value`), ignoring case."""
    haystack = " ".join(json.dumps(t) if isinstance(t, dict) else str(t or "") for t in texts).lower()
    haystack += " " + " ".join(f"{k}={v}".lower() for t in texts if isinstance(t, dict) for k, v in t.items())
    return all(word in haystack for word in query.lower().split())


def _paged(rows: list, page: int) -> dict:
    pages = max(1, -(-len(rows) // PAGE))
    page = min(max(page, 1), pages)
    return {"rows": rows[(page - 1) * PAGE: page * PAGE], "total": len(rows), "page": page, "pages": pages}


def _sessions_by_id(st: ControlPlane, owner: str) -> dict[str, dict]:
    rows, _ = st.store.list_sessions(owner, 1_000_000, 0)
    return {row["id"]: row for row in rows}


def runs(st: ControlPlane, owner: str, query: str = "", state: str = "", page: int = 1) -> dict:
    """The caller's runs and others' runs with a published checkpoint, each with its status."""
    listed = rest.list_training_runs(ALL, 0, "accessible", owner=owner, st=st)
    sessions = _sessions_by_id(st, owner)
    out = []
    for run in listed["training_runs"]:
        session_id = session_of_run(run["training_run_id"])
        run = dict(run, session_id=session_id, mine=run["model_owner"] == owner_urn(owner),
                   status=status.run_status(st, run["training_run_id"], sessions.get(session_id)))
        if (not state or run["status"] == state) and _matches(query, run["training_run_id"], run["base_model"],
                                                             run["user_metadata"] or {}):
            out.append(run)
    return _paged(out, page)


def run(st: ControlPlane, owner: str, run_id: str) -> dict:
    info = rest.get_training_run(run_id, "accessible", owner=owner, st=st)
    checkpoints = rest.list_run_checkpoints(run_id, owner=owner, st=st)["checkpoints"]
    session_id = session_of_run(run_id)
    mine = info["model_owner"] == owner_urn(owner)
    session = st.store.session(session_id) if mine else None
    return dict(info, session_id=session_id, mine=mine, checkpoints=checkpoints,
                status=status.run_status(st, run_id, session), session=session)


def sessions(st: ControlPlane, owner: str, query: str = "", state: str = "", page: int = 1) -> dict:
    out = []
    for row in _sessions_by_id(st, owner).values():
        row = dict(row, status=status.session_status(st, row))
        if (not state or row["status"] == state) and _matches(query, row["id"], row["user_metadata"] or {},
                                                             " ".join(row["tags"] or [])):
            out.append(row)
    return _paged(out, page)


def session(st: ControlPlane, owner: str, session_id: str) -> dict:
    listed = rest.get_session(session_id, "owned", owner=owner, st=st)
    row = st.session(session_id, owner)
    runs_here = [dict(rest.get_training_run(r, "owned", owner=owner, st=st),
                      status=status.run_status(st, r, row)) for r in listed["training_run_ids"]]
    return dict(row, status=status.session_status(st, row), runs=runs_here, sampler_ids=listed["sampler_ids"],
                user_metadata=listed["user_metadata"])


def checkpoints(st: ControlPlane, owner: str, query: str = "", page: int = 1) -> dict:
    rows = rest.list_user_checkpoints(ALL, 0, owner=owner, st=st)["checkpoints"]
    rows = [c for c in rows if _matches(query, c["tinker_path"], c["user_metadata"] or {})]
    return _paged(rows, page)


def checkpoint(st: ControlPlane, owner: str, run_id: str, checkpoint_id: str) -> dict:
    run_info = rest.get_training_run(run_id, "accessible", owner=owner, st=st)
    found = [c for c in rest.list_run_checkpoints(run_id, owner=owner, st=st)["checkpoints"]
             if c["checkpoint_id"] == checkpoint_id]
    if not found:
        raise NotFound(f"checkpoint {checkpoint_id!r} of training run {run_id!r} not found")
    return dict(found[0], run=run_info, mine=run_info["model_owner"] == owner_urn(owner))


def samplable(st: ControlPlane, owner: str) -> dict:
    """What the playground can sample: the served base models and every readable sampler / state checkpoint."""
    rows = rest.list_user_checkpoints(ALL, 0, owner=owner, st=st)["checkpoints"]
    for run in rest.list_training_runs(ALL, 0, "accessible", owner=owner, st=st)["training_runs"]:
        if run["model_owner"] != owner:  # another key's run: only its published checkpoints are listed
            rows += rest.list_run_checkpoints(run["training_run_id"], owner=owner, st=st)["checkpoints"]
    paths = [c["tinker_path"] for c in rows if c["checkpoint_type"] in ("sampler", "training")]
    return {"base_models": sorted(st.base_models), "checkpoints": paths}


def online_models(st: ControlPlane, owner: str) -> dict:
    rows, _ = st.store.list_online_models(owner, ALL, 0)
    return {"rows": [online.describe(st, r) for r in rows]}


def online_model(st: ControlPlane, owner: str, name: str) -> dict:
    """The model as `GET /api/v1/online/NAME` reads it, and its retention curve as chart points."""
    data = online.describe(st, online.owned(st, owner, name))
    curve = [p for p in data["retention"] if not p.get("rebuilt")]
    data["curves"] = {key: [[p["update"], p[key]] for p in curve if p.get(key) is not None]
                      for key in ("probe_nll", "anchor_nll", "seconds")}
    return data
