"""Task-level jobs over HTTP: create, list, read, cancel; and the report route of a job's own runner.

A caller sees only its own jobs (404 otherwise). The runner authenticates with its job token (`control.jobs.
manager`), which `auth.caller` maps to the job's owner, so `GET /jobs/ID` works for it too; `POST /jobs/ID/report`
accepts only the live token of that very job. Everything else is `JobManager`'s.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Header, HTTPException

from tinkerd.control.jobs.manager import JobManager, job_json, token_hash
from tinkerd.control.plane import ControlPlane
from tinkerd.protocol.requests import Body
from tinkerd.server.auth import caller
from tinkerd.server.deps import jobs, plane

router = APIRouter(prefix="/api/v1")


class JobRequest(Body):
    kind: Any = None
    data: Any = None  # the JSONL file's text
    base_model: str | None = None  # default: the first base model served
    grader: Any = None
    budget: Any = None  # "15m", "40 steps", or {"minutes": M, "steps": N}; default 15 minutes
    hyperparameters: Any = None


def _own(st: ControlPlane, job_id: str, owner: str) -> dict:
    return st.owned(st.store.job(job_id), owner, "job", job_id)


@router.post("/jobs")
def create_job(body: JobRequest, owner: str = Depends(caller), st: ControlPlane = Depends(plane),
               manager: JobManager = Depends(jobs)) -> dict:
    base_model = body.base_model or next(iter(st.base_models))
    job = manager.submit(owner, body.kind, base_model, body.data, body.grader, body.budget, body.hyperparameters)
    return job_json(job)


@router.get("/jobs")
def list_jobs(limit: int = 100, offset: int = 0, owner: str = Depends(caller),
              st: ControlPlane = Depends(plane)) -> dict:
    rows, total = st.store.list_jobs(owner, max(1, min(limit, 1000)), max(0, offset))
    return {"jobs": [job_json(r) for r in rows], "total": total}


@router.get("/jobs/{job_id}")
def get_job(job_id: str, owner: str = Depends(caller), st: ControlPlane = Depends(plane),
            x_api_key: str | None = Header(default=None)) -> dict:
    job = _own(st, job_id, owner)
    return job_json(job, for_runner=job["token_hash"] is not None and job["token_hash"] == token_hash(x_api_key or ""))


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: str, owner: str = Depends(caller), st: ControlPlane = Depends(plane),
               manager: JobManager = Depends(jobs)) -> dict:
    return job_json(manager.cancel(_own(st, job_id, owner)))


@router.post("/jobs/{job_id}/report", include_in_schema=False)
def report(job_id: str, body: dict, st: ControlPlane = Depends(plane), manager: JobManager = Depends(jobs),
           x_api_key: str | None = Header(default=None)) -> dict:
    job = st.store.job(job_id)
    if job is None or job["token_hash"] is None or job["token_hash"] != token_hash(x_api_key or ""):
        raise HTTPException(401, "only this job's runner, with its current token, may report")
    return manager.report(job, body)
