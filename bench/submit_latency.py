"""How fast the HTTP side answers while the engine is busy: submit and retrieve latency under load.

    python -m bench.submit_latency [--tenants 8] [--in-flight 512] [--seconds 30]

`--tenants` API keys each open a session and a training run on the embedded model, then a load
generator keeps `--in-flight` requests outstanding between them: sample requests (most of them),
forward passes and session heartbeats, each waited for with `retrieve_future` long-polls.

The figures that say how responsive the server is come from a *probe*: a separate process with its own
key, session and training run and one keep-alive connection (as one SDK client), which in a loop times
a heartbeat, the submit of a sample, the submit of a forward pass, and a `retrieve_future` of a request
that has already finished (so the poll's time is the server's, not the engine's queue). The load
generator's own timings (`load_*`) are printed too, but with 512 requests in one asyncio process they
include the generator's own queueing for its connection pool and the CPU it shares with the server.
Prints one JSON line of percentiles (ms). Goal (issue 24): probe submits < 100 ms, retrieve p99 < 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import MODEL_CACHE, emit

EMBEDDED = "HuggingFaceTB/SmolLM2-135M-Instruct"
DROPPED = [0]  # requests resent because the connection dropped


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ms = sorted(v * 1e3 for v in values)
    pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return {"n": len(ms), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ms[-1],
            "mean": statistics.fmean(ms)}


class Tenant:
    def __init__(self, client, key: str, index: int) -> None:
        self.client, self.headers, self.index = client, {"X-API-Key": key}, index
        self.session = self.model_id = None
        self.seq_id = 0

    async def post(self, route: str, **kwargs):
        """POST, resent once on a dropped keep-alive connection (as the SDK resends); counted in `dropped`."""
        import httpx

        headers = {**self.headers, **kwargs.pop("headers", {})}
        for attempt in range(3):
            try:
                r = await self.client.post(f"/api/v1/{route}", headers=headers, **kwargs)
                break
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.ConnectError):
                DROPPED[0] += 1
                if attempt == 2:
                    raise
        r.raise_for_status()
        return r

    async def open(self) -> None:
        self.session = (await self.post("create_session", json={"tags": []})).json()["session_id"]
        fut = (await self.post("create_model", json={"session_id": self.session, "model_seq_id": 0,
                                                     "base_model": EMBEDDED, "lora_config": {"rank": 8}})).json()
        self.model_id = fut["model_id"]
        await self.result(fut["request_id"], [])

    async def result(self, request_id: str, polls: list[float]) -> None:
        while True:
            started = time.perf_counter()
            body = (await self.post("retrieve_future", json={"request_id": request_id})).json()
            if body.get("type") != "try_again":
                polls.append(time.perf_counter() - started)
                return


def forward_only_body(req) -> bytes:
    """A ForwardBackwardRequest as the SDK's protobuf body of a forward pass (forward_only)."""
    from tinker.proto.request_conv import forward_backward_request_to_proto

    msg = forward_backward_request_to_proto(req)
    msg.forward_only = True
    return msg.SerializeToString()


def probe(url: str, key: str, seconds: float, out) -> None:
    """The probe process: one client timing one request at a time (see the module doc). A second client in a
    thread long-polls the probe's requests until they finish, so the timed loop never waits for the engine."""
    import queue
    import threading

    import httpx
    from tinker import types

    timings: dict[str, list[float]] = {"heartbeat": [], "sample": [], "forward": [], "retrieve_finished": []}
    pending: queue.SimpleQueue = queue.SimpleQueue()
    finished: queue.SimpleQueue = queue.SimpleQueue()
    headers = {"X-API-Key": key}

    def wait(client: httpx.Client, request_id: str) -> None:
        while client.post("/api/v1/retrieve_future", json={"request_id": request_id}).json().get("type") == "try_again":
            pass

    def waiter() -> None:
        with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
            while (request_id := pending.get()) is not None:
                wait(client, request_id)
                finished.put(request_id)

    with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
        def post(route: str, timed: str | None = None, **kwargs):
            started = time.perf_counter()
            r = client.post(f"/api/v1/{route}", **kwargs)
            r.raise_for_status()
            if timed:
                timings[timed].append(time.perf_counter() - started)
            return r.json()

        session = post("create_session", json={"tags": ["probe"]})["session_id"]
        fut = post("create_model", json={"session_id": session, "model_seq_id": 0, "base_model": EMBEDDED,
                                         "lora_config": {"rank": 8}})
        model_id = fut["model_id"]
        wait(client, fut["request_id"])
        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        seq_id, deadline = 0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            post("session_heartbeat", "heartbeat", json={"session_id": session})
            sample = post("asample", "sample", json={
                "base_model": EMBEDDED, "num_samples": 1, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
                "sampling_params": {"max_tokens": 1, "temperature": 1.0}})
            seq_id += 1
            datum = types.Datum(model_input=types.ModelInput.from_ints([5, 6, 7]),
                                loss_fn_inputs={"target_tokens": [6, 7, 8], "weights": [1.0] * 3})
            req = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(
                data=[datum], loss_fn="cross_entropy"), model_id=model_id, seq_id=seq_id)
            forward = post("forward_backward", "forward", content=forward_only_body(req),
                           headers={"Content-Type": "application/x-protobuf"})
            pending.put(sample["request_id"])
            pending.put(forward["request_id"])
            while not finished.empty():
                post("retrieve_future", "retrieve_finished", json={"request_id": finished.get()})
            time.sleep(0.1)
        pending.put(None)
    out.put(timings)


async def load(url: str, keys: list[str], in_flight: int, seconds: float) -> dict:
    import httpx
    from tinker import types
    limits = httpx.Limits(max_connections=in_flight + 16, max_keepalive_connections=in_flight + 16)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        tenants = [Tenant(client, key, i) for i, key in enumerate(keys)]
        for tenant in tenants:
            await tenant.open()
        rng = np.random.default_rng(0)
        submits: dict[str, list[float]] = {"sample": [], "forward": [], "heartbeat": []}
        polls: list[float] = []
        deadline = time.perf_counter() + seconds

        def forward_body(tenant: Tenant) -> bytes:
            row = rng.integers(3, 49152, size=65).tolist()
            datum = types.Datum(model_input=types.ModelInput.from_ints(row[:-1]),
                                loss_fn_inputs={"target_tokens": row[1:], "weights": [1.0] * 64})
            tenant.seq_id += 1
            req = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(
                data=[datum], loss_fn="cross_entropy"), model_id=tenant.model_id, seq_id=tenant.seq_id)
            return forward_only_body(req)

        async def one(tenant: Tenant) -> None:
            kind = random.choices(["sample", "forward", "heartbeat"], [6, 1, 1])[0]
            started = time.perf_counter()
            if kind == "heartbeat":
                await tenant.post("session_heartbeat", json={"session_id": tenant.session})
                submits[kind].append(time.perf_counter() - started)
                return
            if kind == "sample":
                prompt = rng.integers(3, 49152, size=16).tolist()
                fut = (await tenant.post("asample", json={
                    "base_model": EMBEDDED, "num_samples": 1,
                    "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
                    "sampling_params": {"max_tokens": 16, "temperature": 1.0}})).json()
            else:
                fut = (await tenant.post("forward_backward", content=forward_body(tenant),
                                         headers={"Content-Type": "application/x-protobuf"})).json()
            submits[kind].append(time.perf_counter() - started)
            await tenant.result(fut["request_id"], polls)

        async def worker(i: int) -> None:
            tenant = tenants[i % len(tenants)]
            while time.perf_counter() < deadline:
                await one(tenant)

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(in_flight)))
        wall = time.perf_counter() - started
    figures = {f"load_submit_{kind}_ms": percentiles(v) for kind, v in submits.items()}
    figures["load_retrieve_with_result_ms"] = percentiles(polls)
    figures["requests_per_s"] = sum(len(v) for v in submits.values()) / wall
    figures["resent_after_dropped_connection"] = DROPPED[0]
    return figures


def measure(url: str, keys: list[str], in_flight: int, seconds: float) -> dict:
    """The load generator here and the probe in its own process, over the same seconds."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    prober = context.Process(target=probe, args=(url, "tml-bench-probe", seconds, out), daemon=True)
    prober.start()
    figures = asyncio.run(load(url, keys, in_flight, seconds))
    timings = out.get(timeout=300)
    prober.join(timeout=30)
    probed = {f"probe_{kind}_ms": percentiles(v) for kind, v in timings.items()}
    probed["probe_submit_p99_ms"] = max(probed[f"probe_{k}_ms"].get("p99", float("nan")) for k in ("heartbeat", "sample", "forward"))
    probed["probe_retrieve_p99_ms"] = probed["probe_retrieve_finished_ms"].get("p99", float("nan"))
    return {**probed, **figures}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--url", default=None, help="a running server (default: start one on the embedded model)")
    args = parser.parse_args()
    keys = [f"tml-bench-{i}" for i in range(args.tenants)]
    config = {"tenants": args.tenants, "in_flight": args.in_flight, "seconds": args.seconds}
    if args.url:
        emit("submit_latency", **config, **measure(args.url, keys, args.in_flight, args.seconds))
        return
    from tinkerd.local_server import LocalServer

    with tempfile.TemporaryDirectory() as tmp, LocalServer(Path(tmp), model_cache=MODEL_CACHE) as server:
        emit("submit_latency", **config, **measure(server.url, keys, args.in_flight, args.seconds))


if __name__ == "__main__":
    main()
