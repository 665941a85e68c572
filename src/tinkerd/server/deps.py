"""What a route asks FastAPI for: the control plane of this app, its job queue, uploaded files and online learner,
and its in-memory download and copy records.

The one way routes reach the server's state (`Depends(plane)`); `create_app` puts them on `app.state`.
Async on purpose: FastAPI would run a plain `def` dependency in its thread pool, a hop per request.
"""

from __future__ import annotations

from fastapi import Request

from tinkerd.control.checkpoints import RememberedCopies
from tinkerd.control.downloads import DownloadGrants
from tinkerd.control.jobs.manager import JobManager
from tinkerd.control.jobs.uploads import Uploads
from tinkerd.control.online.learner import OnlineLearner
from tinkerd.control.plane import ControlPlane


async def plane(request: Request) -> ControlPlane:
    return request.app.state.tinkerd


async def jobs(request: Request) -> JobManager:
    return request.app.state.jobs


async def uploads(request: Request) -> Uploads:
    return request.app.state.uploads


async def online_learner(request: Request) -> OnlineLearner:
    return request.app.state.online


async def download_grants(request: Request) -> DownloadGrants:
    return request.app.state.download_grants


async def remembered_copies(request: Request) -> RememberedCopies:
    return request.app.state.remembered_copies
