"""What each console page shows, from the functions the SDK's REST routes run (so the same visibility rules)
plus the run and session states (`control.status`), and task-level jobs as `GET /api/v1/jobs/ID` shows them
(`control.jobs.manager.job_json`). Search, status filters and paging happen here.

Knows the REST JSON shapes; not HTML (the templates), not how the rows are stored.
"""

from __future__ import annotations

import json

from tinkerd.control import status
from tinkerd.control.jobs.manager import job_json
from tinkerd.control.online import models as online
from tinkerd.control.plane import ControlPlane, NotFound
from tinkerd.protocol.paths import owner_urn, parse_tinker_path, session_of_run
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


def jobs(st: ControlPlane, owner: str, page: int = 1) -> dict:
    """The caller's jobs, newest first, a page at a time, each with its held-out headline."""
    total = st.store.list_jobs(owner, 1, 0)[1]
    pages = max(1, -(-total // PAGE))
    page = min(max(page, 1), pages)
    rows, _ = st.store.list_jobs(owner, PAGE, (page - 1) * PAGE)
    return {"rows": [dict(j, headline=_headline(j)) for j in map(job_json, rows)], "total": total, "page": page,
            "pages": pages}


def job(st: ControlPlane, owner: str, job_id: str) -> dict:
    """A job with its headline, a curve per recorded metric, its evaluations side by side, and its result's
    checkpoints as links."""
    data = job_json(st.owned(st.store.job(job_id), owner, "job", job_id))
    data["headline"] = _headline(data)
    series: dict[str, list] = {}
    for row in data["metrics"]:
        for key, value in row.items():
            if key not in ("step", "elapsed_s") and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, []).append([row["step"], value])
    first = (data["headline"] or {}).get("metric")
    data["curves"] = sorted(series.items(), key=lambda kv: (kv[0] != first, not kv[0].startswith("held_out"),
                                                            kv[0] == "lr", kv[0]))
    evals = data["evals"] or {}
    names = [k for k in {**(evals.get("before") or {}), **(evals.get("last") or {})} if k != "step"]
    data["eval_rows"] = [{"name": k, "before": (evals.get("before") or {}).get(k),
                          "best": ((evals.get("best") or {}).get("metrics") or {}).get(k),
                          "after": (evals.get("after") or {}).get(k)} for k in names]
    result = data["result"] or {}
    data["checkpoints"] = [_checkpoint_link(result[key], label) for key, label in
                           (("sampler_path", "sampler"), ("state_path", "state")) if result.get(key)]
    upload = st.store.file(data["data_file"]) if data["data_file"] else None
    data["upload"] = upload if upload is not None and upload["owner"] == owner else None
    return data


def _headline(job: dict) -> dict | None:
    """The held-out metric the job optimises: before training, best so far (and at which step), which way is
    better; None before the first evaluation."""
    result = job["result"] or {}
    if not result.get("metric"):
        return None
    before = ((job["evals"] or {}).get("before") or {}).get(result["metric"])
    return {"metric": result["metric"], "before": before, "best": result.get("value"),
            "best_step": result.get("best_step"), "better": result.get("better")}


def _checkpoint_link(path: str, label: str) -> dict:
    run_id, kind, name = parse_tinker_path(path)
    return {"label": label, "tinker_path": path, "url": f"/checkpoints/{run_id}/{kind}/{name}"}
