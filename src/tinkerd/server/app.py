"""Builds the FastAPI application from a Store and an engine (`Trainer` + `Sampler`).

Logs one line per request with its duration. At start-up, training runs the previous process parked
on its way down are adopted (`lifecycle`), runs it left behind in a crash are rebuilt from their
restore points and request journal (`recovery`), and the futures still pending after that fail with a
clear error instead of hanging their pollers (sample requests: 410, resend). At shutdown, loaded
runs are parked.
Background tasks: expired checkpoints are purged, training runs of finished or lapsed
sessions are unloaded (`lifecycle`), the job queue starts job runners, resuming the jobs a previous
process left running (`control.jobs.manager`; uploaded files, `control.jobs.uploads`, lose a crash's leftovers),
and the online learner trains online models on their stored feedback, first resuming those a previous process
left (`control.online.learner`). Knows how the pieces of `control` fit the app's life; the work itself is theirs
(no torch, no engine internals).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles

from tinkerd.control.checkpoints import RememberedCopies, purge_expired
from tinkerd.control.downloads import DownloadGrants
from tinkerd.control.futures import FutureBoard
from tinkerd.control.jobs.manager import JobManager
from tinkerd.control.jobs.uploads import Uploads
from tinkerd.control.lifecycle import adopt_parked, park_all, sweep_forever
from tinkerd.control.metrics import ServerMetrics
from tinkerd.control.online.learner import OnlineLearner
from tinkerd.control.plane import ControlPlane, ServerConfig
from tinkerd.control.recovery import rebuild, recover
from tinkerd.control.scheduler import Scheduler
from tinkerd.engine.interface import Sampler, Trainer
from tinkerd.server.console import pages, signin
from tinkerd.server.errors import install_error_handlers
from tinkerd.server.request_log import RequestLog
from tinkerd.server.responses import FiniteJSONResponse
from tinkerd.server.routes import (checkpoints, curves, custom_losses, downloads, files, futures, identity, jobs,
                                   online, openai, rest, sampling, service, training)
from tinkerd.store.db import Store, open_store

log = logging.getLogger("tinkerd.http")


async def _run_jobs(manager: JobManager, every_seconds: float = 0.5) -> None:
    """The job queue's loop, in the event loop's thread on purpose (see `JobManager`)."""
    while True:
        manager.tick()
        await asyncio.sleep(every_seconds)


async def _purge_expired_checkpoints(state: ControlPlane, every_seconds: float = 600.0) -> None:
    """Checkpoints whose TTL has passed are deleted (rows and files) every ten minutes."""
    while True:
        removed = await asyncio.to_thread(purge_expired, state)
        if removed:
            log.info("deleted %d expired checkpoints", removed)
        await asyncio.sleep(every_seconds)


def create_app(config: ServerConfig, trainer: Trainer, sampler: Sampler, store: Store | None = None) -> FastAPI:
    """Without `store`, opens `config.store` (a URL; None: SQLite in the data dir) and closes it at shutdown."""
    owns_store = store is None
    store = store or open_store(config.store, config.data_dir)
    metrics = ServerMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        board = FutureBoard(store)
        board.bind_loop(asyncio.get_running_loop())
        scheduler = Scheduler(board, trainer.forward_backward_many, sampler, metrics, config.batch_gather_seconds,
                              config.paths.versions)
        scheduler.start()
        app.state.tinkerd = ControlPlane(config, store, trainer, sampler, board, scheduler,
                                        {m.name: m for m in trainer.base_models()})
        scheduler.on_run_lost = lambda model_id: rebuild(app.state.tinkerd, model_id)
        adopted = adopt_parked(app.state.tinkerd)
        if adopted:
            log.info("%d training runs parked by the previous process resume on their next request", adopted)
        recovered, answered = recover(app.state.tinkerd)  # before the rest of the in-flight requests fail
        if recovered:
            log.info("%d training runs are being rebuilt from their restore points and request journal", recovered)
        lost = store.fail_unfinished_futures("the server restarted while this sample request was in flight; "
                                             "send it again", kind="sample", state="lost")
        stale = store.fail_unfinished_futures("the server restarted while this request was in flight; resubmit it",
                                              keep=answered)
        if lost or stale:
            log.warning("%d sample requests (answered 410: resend) and %d other requests were left in flight by the "
                        "previous server process", lost, stale)
        app.state.uploads = Uploads(store, config.paths.files, config.job_max_file_bytes, config.file_quota_bytes)
        app.state.jobs = JobManager(store, config.paths.jobs, config.jobs_url,
                                    {m.name: (m.tokenizer_id, m.max_context_length) for m in trainer.base_models()},
                                    config.jobs_per_key, config.job_max_file_bytes, app.state.uploads)
        if app.state.jobs.resume_all():
            log.info("jobs left running by the previous process resume from their last state checkpoint")
        job_loop = asyncio.get_running_loop().create_task(_run_jobs(app.state.jobs))
        app.state.online = OnlineLearner(app.state.tinkerd)  # resumes the previous process's online models first
        learner = asyncio.get_running_loop().create_task(app.state.online.run_forever())
        janitor = asyncio.get_running_loop().create_task(_purge_expired_checkpoints(app.state.tinkerd))
        sweeper = asyncio.get_running_loop().create_task(sweep_forever(app.state.tinkerd))
        yield
        job_loop.cancel()
        learner.cancel()
        app.state.jobs.stop_all()
        janitor.cancel()
        sweeper.cancel()
        if config.parked_state_ttl_seconds > 0 and config.shutdown_park_seconds > 0:
            parked = await park_all(app.state.tinkerd, config.shutdown_park_seconds)
            if parked:
                log.info("parked %d training runs in %s for the next process", parked, config.paths.parked_root)
        await scheduler.stop()
        if owns_store:
            store.close()

    app = FastAPI(title="tinkerd", lifespan=lifespan, default_response_class=FiniteJSONResponse)
    app.state.download_grants, app.state.remembered_copies = DownloadGrants(), RememberedCopies()
    app.state.csrf_secret = secrets.token_bytes(32)  # the console's CSRF tokens (`server.auth`)
    install_error_handlers(app)
    for module in (service, identity, training, custom_losses, checkpoints, sampling, futures, curves, rest,
                   downloads, files, jobs, online, signin, pages):
        app.include_router(module.router)
    for prefix in openai.PREFIXES:
        app.include_router(openai.router, prefix=prefix)
    app.mount("/console/static", StaticFiles(directory=Path(pages.__file__).parent / "static"), name="console-static")

    @app.exception_handler(signin.SignInRequired)
    async def sign_in_first(request: Request, exc: signin.SignInRequired) -> Response:
        return signin.sign_in_redirect(exc.next_url)

    app.add_middleware(RequestLog, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(request: Request) -> Response:
        metrics.set_online(await asyncio.to_thread(request.app.state.tinkerd.store.online_totals))
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app
