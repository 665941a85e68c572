"""One log line and one latency observation per request, as a plain ASGI middleware.

Not `@app.middleware("http")`: Starlette's `BaseHTTPMiddleware` runs every request in an extra anyio task
group and spawns a task for each read of the body. Under load (hundreds of requests in flight, most of them
long-polls) that machinery took most of the event loop's time (py-spy, 128 requests in flight on the
embedded model: about half of the loop's GIL-holding samples were in its `receive_or_disconnect`), and every
submit queued behind it. This wrapper only times the call and notes the status the app sends.
"""

from __future__ import annotations

import logging
import time

from tinkerd.control.metrics import ServerMetrics

log = logging.getLogger("tinkerd.http")


class RequestLog:
    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def noting_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            seconds = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")  # the template: bounded label values
            self.metrics.request_seconds.labels(scope["method"], route, str(status[0])).observe(seconds)
            log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status[0], seconds * 1e3)
