"""`VllmSampler`: the `Sampler` protocol over a vLLM OpenAI-compatible server (`--sampler vllm`).

Requests run as coroutines on this sampler's own event-loop thread (httpx); `step()` hands the
finished ones to the scheduler, waiting up to `poll_seconds` when none has finished yet, so the
engine thread neither spins nor stalls training for long.

Adapters: an adapter version (`AdapterVersions`) is loaded under its immutable name
`model_id@version` with `POST /v1/load_lora_adapter {lora_name, lora_path}` before its first
sample, and unloaded (`/v1/unload_lora_adapter`) when the registry retires it. A checkpoint folder
(`create_sampling_client(model_path=...)`) is loaded under a name derived from its path and file
time; idle ones beyond `max_idle_checkpoints` are unloaded. The base model is sampled under
vLLM's name for it (`base_models`). vLLM needs to see the folders at the same paths (shared
storage), and runtime LoRA updates enabled (VLLM_ALLOW_RUNTIME_LORA_UPDATING=1, --enable-lora).

Failures: 5xx answers, timeouts and connection errors are retried with exponential backoff, then
become a `server` error naming the URL. A 404 on a completion means vLLM lost the adapter
(restart, eviction): load it again and retry once. Other 4xx answers are `user` errors carrying
vLLM's message. Knows nothing about the front end's ordering, the Store or torch.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import httpx

from tinkerd.backends.versions import AdapterVersions, Version
from tinkerd.engine.interface import SampleTask
from tinkerd.backends.vllm_completions import build_result, check_supported, completion_bodies
from tinkerd.protocol.types import BadRequest, SampleResult

log = logging.getLogger(__name__)


class VllmUnavailable(RuntimeError):
    """vLLM did not answer usefully after the retries (reported as a `server` error)."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # tries per HTTP call, the first included
    backoff_seconds: float = 0.5  # before the second try; doubles each time
    timeout_seconds: float = 600.0  # one HTTP call (a long sample is one call)


def checkpoint_adapter_name(folder: str) -> str:
    """An adapter name for a checkpoint folder; a folder rewritten under the same path gets a new name."""
    weights = Path(folder) / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns if weights.exists() else 0
    return "ckpt-" + hashlib.sha256(f"{os.path.realpath(folder)}\0{stamp}".encode()).hexdigest()[:16]


def _vllm_message(response: httpx.Response) -> str:
    """vLLM's error text: `{"error": {"message"}}` (current), `{"message"}` (older), or the raw body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "message" in body:
            return str(body["message"])
        if "detail" in body:
            return str(body["detail"])
    return response.text[:500]


class VllmSampler:
    def __init__(self, url: str, base_models: dict[str, str], versions: AdapterVersions | None = None,
                 retry: RetryPolicy = RetryPolicy(), poll_seconds: float = 0.02, max_concurrency: int = 64,
                 max_idle_checkpoints: int = 8) -> None:
        """`base_models`: our base model name -> vLLM's name for it (`--served-model-name`)."""
        self.url = url.rstrip("/")
        self.base_models = dict(base_models)
        self.versions = versions
        self.retry = retry
        self.poll_seconds = poll_seconds
        self.max_idle_checkpoints = max_idle_checkpoints
        self._done: queue.SimpleQueue[tuple[str, SampleResult | Exception]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._inflight: dict[str, Future] = {}
        self._cancelled: set[str] = set()
        # The rest is touched on the sampler's loop thread only.
        self._loaded: set[str] = set()  # adapter names this process loaded into vLLM
        self._load_locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._checkpoints: collections.OrderedDict[str, int] = collections.OrderedDict()  # name -> requests, LRU
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tinkerd-vllm", daemon=True)
        self._thread.start()
        self._limit = asyncio.Semaphore(max_concurrency)
        self._client = self._call(self._make_client())
        if versions is not None:
            versions.on_retire.append(self._on_retire)

    async def _make_client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
        return httpx.AsyncClient(base_url=self.url, timeout=self.retry.timeout_seconds, limits=limits)

    def _call(self, coroutine):
        """Run a coroutine on the sampler's loop from another thread and wait for it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    # the Sampler protocol

    def submit(self, request: SampleTask) -> None:
        future = asyncio.run_coroutine_threadsafe(self._sample(request), self._loop)
        self._inflight[request.request_id] = future
        future.add_done_callback(lambda f, rid=request.request_id: self._finished(rid, f))

    def cancel(self, request_id: str) -> None:
        future = self._inflight.get(request_id)
        if future is not None:
            self._cancelled.add(request_id)
            future.cancel()  # the coroutine stops at its next await; its adapter reference is released

    def has_work(self) -> bool:
        return bool(self._inflight) or not self._done.empty()

    def step(self) -> list[tuple[str, SampleResult | Exception]]:
        """The requests that finished since the last step; waits up to `poll_seconds` for one."""
        if self._done.empty() and self._inflight:
            self._wake.wait(self.poll_seconds)
        self._wake.clear()
        finished = []
        while not self._done.empty():
            request_id, outcome = self._done.get()
            if request_id in self._cancelled:
                self._cancelled.discard(request_id)
                continue
            finished.append((request_id, outcome))
        return finished

    def sample(self, request: SampleTask) -> SampleResult:
        """Run one request to completion from a thread that is not the scheduler (tests, scripts)."""
        return self._call(self._sample(request))

    def _finished(self, request_id: str, future: Future) -> None:
        self._inflight.pop(request_id, None)
        if future.cancelled():
            outcome: SampleResult | Exception = BadRequest("cancelled")
        else:
            exc = future.exception()
            outcome = exc if exc is not None else future.result()
        self._done.put((request_id, outcome))
        self._wake.set()

    # one request

    async def _sample(self, request: SampleTask) -> SampleResult:
        check_supported(request)
        base = self.base_models.get(request.adapter.base_model)
        if base is None:
            raise BadRequest(f"base_model {request.adapter.base_model!r} is not served here; "
                             f"served: {sorted(self.base_models)}")
        uri = request.adapter.uri
        if uri is None:
            return await self._complete_all(request, base, None)
        if request.adapter.memory_key is not None:
            raise BadRequest(f"sampler weights {uri!r} are in-memory snapshots, which the vLLM sampler cannot load")
        if self.versions is not None and self.versions.is_version(uri):
            version = self.versions.acquire(uri)
            try:
                return await self._complete_all(request, version.name, str(version.path))
            finally:
                self.versions.release(version)
        if not (Path(uri) / "adapter_config.json").is_file():
            raise BadRequest(f"sampler weights folder {uri!r} has no adapter_config.json (was it deleted?)")
        name = checkpoint_adapter_name(uri)
        self._checkpoints[name] = self._checkpoints.get(name, 0) + 1
        self._checkpoints.move_to_end(name)
        try:
            return await self._complete_all(request, name, uri)
        finally:
            self._checkpoints[name] -= 1
            await self._unload_idle_checkpoints()

    async def _complete_all(self, request: SampleTask, model: str, path: str | None) -> SampleResult:
        """Sample under vLLM name `model`, an adapter loaded from `path` (None: the base model)."""
        if path is not None:
            await self._ensure(model, path)
        bodies = completion_bodies(request, model)
        async with self._limit:
            responses = await asyncio.gather(*(self._complete(body, path) for body in bodies))
        try:
            return build_result(list(responses), request)
        except ValueError as exc:
            raise VllmUnavailable(f"vLLM at {self.url} gave an answer tinkerd cannot read: {exc}") from exc

    async def _complete(self, body: dict, path: str | None) -> dict:
        name = body["model"]
        for reload in (False, True):
            response = await self._post("/v1/completions", body)
            if response.status_code == 404 and path is not None and not reload:
                log.warning("vLLM at %s lost adapter %s (404); loading it again", self.url, name)
                self._loaded.discard(name)
                await self._ensure(name, path)
                continue
            if response.status_code == 404:
                what = f"adapter {name!r} even after loading it again" if path else f"base model {name!r}"
                raise VllmUnavailable(f"vLLM at {self.url} does not serve {what}: {_vllm_message(response)}")
            if response.status_code >= 400:
                raise BadRequest(f"vLLM rejected the sampling request: {_vllm_message(response)}")
            return response.json()
        raise AssertionError("unreachable")

    # adapters

    async def _ensure(self, name: str, path: str) -> None:
        """Load adapter `name` from `path` unless this process already did (one load per name at a time)."""
        async with self._load_locks[name]:
            if name in self._loaded:
                return
            body = {"lora_name": name, "lora_path": path}
            response = await self._post("/v1/load_lora_adapter", body)
            message = _vllm_message(response) if response.status_code >= 400 else ""
            if response.status_code == 400 and "already" in message:
                # vLLM holds the name although this process did not load it or unloaded it (a load that timed out
                # here but finished there, an unload that failed): replace the registration with our folder.
                await self._post("/v1/unload_lora_adapter", {"lora_name": name})
                response = await self._post("/v1/load_lora_adapter", body)
                message = _vllm_message(response) if response.status_code >= 400 else ""
            if response.status_code == 404:
                raise VllmUnavailable(f"vLLM at {self.url} cannot find adapter files at {path} ({message}); it must "
                                      "see tinkerd's data dir at the same path (shared storage)")
            if response.status_code >= 400:
                raise BadRequest(f"vLLM refused to load the adapter {name!r}: {message} (vLLM must run with "
                                 "--enable-lora, VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 and a --max-lora-rank covering "
                                 "lora_config.rank)")
            self._loaded.add(name)

    async def _unload(self, name: str) -> None:
        async with self._load_locks[name]:
            self._loaded.discard(name)
            try:
                response = await self._post("/v1/unload_lora_adapter", {"lora_name": name})
                if response.status_code >= 400 and response.status_code != 404:
                    log.warning("vLLM did not unload %s: %s", name, _vllm_message(response))
            except VllmUnavailable as exc:
                log.warning("could not unload %s: %s", name, exc)
        self._load_locks.pop(name, None)

    def _on_retire(self, version: Version) -> None:
        """Registry listener (any thread): unload a retired version from vLLM."""
        asyncio.run_coroutine_threadsafe(self._unload(version.name), self._loop)

    async def _unload_idle_checkpoints(self) -> None:
        idle = [name for name, count in self._checkpoints.items() if count == 0]
        for name in idle[:max(0, len(idle) - self.max_idle_checkpoints)]:
            del self._checkpoints[name]
            if name in self._loaded:
                await self._unload(name)

    # HTTP with retries

    async def _post(self, route: str, body: dict) -> httpx.Response:
        """POST; 5xx, timeouts and connection errors are retried with backoff, then `VllmUnavailable`."""
        delay, problem = self.retry.backoff_seconds, ""
        for attempt in range(1, self.retry.attempts + 1):
            try:
                response = await self._client.post(route, json=body)
                if response.status_code < 500:
                    return response
                problem = f"HTTP {response.status_code}: {_vllm_message(response)}"
            except httpx.TimeoutException as exc:
                problem = f"timed out ({type(exc).__name__})"
            except httpx.TransportError as exc:
                problem = f"unreachable ({type(exc).__name__}: {exc})"
            if attempt < self.retry.attempts:
                log.warning("vLLM %s %s (try %d of %d); retrying in %.2f s", route, problem, attempt,
                            self.retry.attempts, delay)
                await asyncio.sleep(delay)
                delay *= 2
        raise VllmUnavailable(f"the vLLM server at {self.url} failed {route} {self.retry.attempts} times: {problem}")
