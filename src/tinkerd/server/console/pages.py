"""The console's pages, at the hosted console's paths (the SDK's `get_console_url` links work with the host
swapped): `/` and `/training_runs`, `/training_runs/{id}`, `/sessions`, `/sessions/{id}`, `/checkpoints`,
`/checkpoints/{run_id}/{checkpoint_id}`, `/playground?mode=checkpoint&checkpoint=<tinker path>`; and tinkerd's
own `/online` and `/online/{name}` (online models: feedback, updates, the retention probe's curve) and `/jobs`,
`/jobs/{id}` (task-level jobs: plan, progress, held-out curves, result checkpoints, cancel).

Plain `def` routes: they read the Store, so FastAPI runs them in its thread pool.
"""

from __future__ import annotations

from typing import Callable

from fastapi import APIRouter, Depends, Request

from tinkerd.control.plane import ControlPlane, NotFound
from tinkerd.control.status import STATUSES
from tinkerd.server.console import views
from tinkerd.server.console.render import render
from tinkerd.server.console.signin import Viewer, viewer
from tinkerd.server.deps import plane

router = APIRouter(include_in_schema=False)


def _page(request: Request, who: Viewer, template: str, build: Callable[[], dict], **context):
    """The page, or a 404 page naming what is missing (another key's id reads as missing too)."""
    try:
        data = build()
    except NotFound as exc:
        return render(request, "missing.html", who, status_code=404, message=str(exc))
    return render(request, template, who, data=data, **context)


@router.get("/")
@router.get("/training_runs")
def runs_page(request: Request, q: str = "", status: str = "", page: int = 1, who: Viewer = Depends(viewer),
              st: ControlPlane = Depends(plane)):
    return _page(request, who, "runs.html", lambda: views.runs(st, who.owner, q, status, page), q=q, status=status,
                 statuses=STATUSES, nav="runs")


@router.get("/training_runs/{run_id}")
def run_page(run_id: str, request: Request, who: Viewer = Depends(viewer), st: ControlPlane = Depends(plane)):
    return _page(request, who, "run.html", lambda: views.run(st, who.owner, run_id), nav="runs")


@router.get("/sessions")
def sessions_page(request: Request, q: str = "", status: str = "", page: int = 1, who: Viewer = Depends(viewer),
                  st: ControlPlane = Depends(plane)):
    return _page(request, who, "sessions.html", lambda: views.sessions(st, who.owner, q, status, page), q=q,
                 status=status, statuses=("active", "finished", "lapsed"), nav="sessions")


@router.get("/sessions/{session_id}")
def session_page(session_id: str, request: Request, who: Viewer = Depends(viewer), st: ControlPlane = Depends(plane)):
    return _page(request, who, "session.html", lambda: views.session(st, who.owner, session_id), nav="sessions")


@router.get("/checkpoints")
def checkpoints_page(request: Request, q: str = "", page: int = 1, who: Viewer = Depends(viewer),
                     st: ControlPlane = Depends(plane)):
    return _page(request, who, "checkpoints.html", lambda: views.checkpoints(st, who.owner, q, page), q=q,
                 nav="checkpoints")


# The SDK quotes the checkpoint id ("sampler_weights%2Fname"); the path arrives decoded, as two segments.
@router.get("/checkpoints/{run_id}/{kind}/{name}")
def checkpoint_page(run_id: str, kind: str, name: str, request: Request, who: Viewer = Depends(viewer),
                    st: ControlPlane = Depends(plane)):
    return _page(request, who, "checkpoint.html", lambda: views.checkpoint(st, who.owner, run_id, f"{kind}/{name}"),
                 nav="checkpoints")


@router.get("/playground")
def playground_page(request: Request, mode: str = "base", checkpoint: str = "", who: Viewer = Depends(viewer),
                    st: ControlPlane = Depends(plane)):
    return _page(request, who, "playground.html", lambda: views.samplable(st, who.owner), chosen=checkpoint,
                 mode=mode, nav="playground")


@router.get("/online")
def online_list_page(request: Request, who: Viewer = Depends(viewer), st: ControlPlane = Depends(plane)):
    return _page(request, who, "online_models.html", lambda: views.online_models(st, who.owner), nav="online")


@router.get("/online/{name}")
def online_page(name: str, request: Request, who: Viewer = Depends(viewer), st: ControlPlane = Depends(plane)):
    return _page(request, who, "online.html", lambda: views.online_model(st, who.owner, name), nav="online")


@router.get("/jobs")
def jobs_page(request: Request, page: int = 1, who: Viewer = Depends(viewer), st: ControlPlane = Depends(plane)):
    return _page(request, who, "jobs.html", lambda: views.jobs(st, who.owner, page), nav="jobs")


@router.get("/jobs/{job_id}")
def job_page(job_id: str, request: Request, who: Viewer = Depends(viewer), st: ControlPlane = Depends(plane)):
    return _page(request, who, "job.html", lambda: views.job(st, who.owner, job_id), nav="jobs")
