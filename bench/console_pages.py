"""How fast the console's pages answer with 200 runs and 10,000 recorded steps in the Store.

    python -m bench.console_pages [--repeat 20]

Builds a SQLite store (`fill_store`: 200 sessions with one run each, 400 checkpoint rows, 10,000 steps, 8,000
of them on one long run), serves it in-process (FastAPI's TestClient: the app's own time, no network) behind
an engine that is never called, signs in, and times each page and the curves route. One JSON line:
the median and the slowest of `repeat` fetches per page, in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

KEY = "tml-bench"
PAGES = ("/", "/training_runs/bench-s0:train:0", "/sessions", "/sessions/bench-s0", "/checkpoints",
         "/checkpoints/bench-s0:train:0/sampler_weights/final", "/playground", "/api/v1/training_runs/bench-s0:train:0/curves")


def fill_store(store, owner: str, runs: int = 200, steps: int = 10_000, long_run_steps: int = 8_000) -> None:
    """`runs` sessions with one run each (two checkpoints apiece); the first run has `long_run_steps` steps
    (forward_backward and optim_step in turns), the rest share what is left of `steps` evenly."""
    per_run = (steps - long_run_steps) // (runs - 1)
    for i in range(runs):
        session, run = f"bench-s{i}", f"bench-s{i}:train:0"
        store.add_session(session, owner, "0.38.0", ["bench"], {"recipe": "sft" if i % 2 else "rl"})
        store.add_model(run, session, owner, "tiny", {"rank": 8}, {"index": str(i)})
        for kind, name in (("weights", "state"), ("sampler_weights", "final")):
            store.add_checkpoint(f"tinker://{run}/{kind}/{name}", run, owner, kind, name, f"/nonexistent/{run}/{name}",
                                 "tiny")
        count = long_run_steps if i == 0 else per_run
        for seq in range(1, count + 1):
            if seq % 2:
                store.add_step(owner, session, run, seq, "forward_backward",
                               {"loss:sum": 100.0 / seq, "tokens": 256, "weight": 128, "loss_per_token": 0.78 / seq})
            else:
                store.add_step(owner, session, run, seq, "optim_step", {"learning_rate": 1e-4, "seconds": 0.2})


class NoEngine:
    """The pages never reach the engine; the scheduler only asks whether there is sampling work."""

    def base_models(self):
        return []

    def forward_backward_many(self, calls):
        raise RuntimeError("not in this benchmark")

    def has_work(self) -> bool:
        return False


def console_client(data_dir: Path):
    """A signed-in TestClient of an app on `data_dir` (the caller enters and leaves it)."""
    from fastapi.testclient import TestClient

    from tinkerd.control.plane import ServerConfig
    from tinkerd.server.app import create_app

    client = TestClient(create_app(ServerConfig(data_dir=data_dir), NoEngine(), NoEngine()))
    return client


def main() -> None:
    from bench.common import emit
    from tinkerd.server.auth import identity

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, console_client(Path(tmp)) as client:
        st = client.app.state.tinkerd
        started = time.perf_counter()
        fill_store(st.store, identity(KEY))
        fill_seconds = time.perf_counter() - started
        client.post("/signin", data={"api_key": KEY, "next": "/"}, follow_redirects=False)
        figures = {}
        for url in PAGES:
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                response = client.get(url)
                times.append((time.perf_counter() - t0) * 1e3)
                assert response.status_code == 200, (url, response.status_code)
            figures[url] = {"median_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1)}
        emit("console_pages", runs=200, steps=10_000, fill_seconds=fill_seconds, pages=figures,
             slowest_median_ms=max(f["median_ms"] for f in figures.values()))


if __name__ == "__main__":
    main()
