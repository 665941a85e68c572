"""Task-level jobs over HTTP: create (JSON or multipart, `server.job_request`), list, read, cancel; and the report
route of a job's own runner.

A caller sees only its own jobs (404 otherwise); the key comes as `X-API-Key` or `Authorization: Bearer`. The
runner authenticates with its job token (`control.jobs.manager`), which `auth.caller` maps to the job's owner, so
`GET /jobs/ID` works for it too; `POST /jobs/ID/report` accepts only the live token of that very job. Everything
else is `JobManager`'s.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool

from tinkerd.control.jobs.manager import JobManager, job_json, token_hash
from tinkerd.control.plane import ControlPlane
from tinkerd.protocol.numbers import INT64_MAX
from tinkerd.server import job_request
from tinkerd.server.auth import key_or_bearer_caller
from tinkerd.server.deps import jobs, plane

router = APIRouter(prefix="/api/v1")


def _own(st: ControlPlane, job_id: str, owner: str) -> dict:
    return st.owned(st.store.job(job_id), owner, "job", job_id)


@router.post("/jobs", openapi_extra=job_request.OPENAPI)
async def create_job(request: Request, owner: str = Depends(key_or_bearer_caller), st: ControlPlane = Depends(plane),
                     manager: JobManager = Depends(jobs)) -> dict:
    """A JSON body, or a multipart form with the data in the file part `file` (`server.job_request`)."""
    args = await job_request.job_arguments(request, manager.max_file_bytes)
    args["base_model"] = args["base_model"] or next(iter(st.base_models))
    return job_json(await run_in_threadpool(manager.submit, owner, **args))  # reads and tokenizes the rows


@router.get("/jobs")
def list_jobs(limit: int = 100, offset: int = Query(0, ge=0, le=INT64_MAX),
              owner: str = Depends(key_or_bearer_caller), st: ControlPlane = Depends(plane)) -> dict:
    rows, total = st.store.list_jobs(owner, max(1, min(limit, 1000)), offset)  # the database's integers: int64
    return {"jobs": [job_json(r) for r in rows], "total": total}


@router.get("/jobs/{job_id}")
def get_job(job_id: str, owner: str = Depends(key_or_bearer_caller), st: ControlPlane = Depends(plane),
            x_api_key: str | None = Header(default=None)) -> dict:
    job = _own(st, job_id, owner)
    return job_json(job, for_runner=job["token_hash"] is not None and job["token_hash"] == token_hash(x_api_key or ""))


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: str, owner: str = Depends(key_or_bearer_caller), st: ControlPlane = Depends(plane),
               manager: JobManager = Depends(jobs)) -> dict:
    return job_json(manager.cancel(_own(st, job_id, owner)))


@router.post("/jobs/{job_id}/report", include_in_schema=False)
def report(job_id: str, body: dict, st: ControlPlane = Depends(plane), manager: JobManager = Depends(jobs),
           x_api_key: str | None = Header(default=None)) -> dict:
    job = st.store.job(job_id)
    if job is None or job["token_hash"] is None or job["token_hash"] != token_hash(x_api_key or ""):
        raise HTTPException(401, "only this job's runner, with its current token, may report")
    return manager.report(job, body)
