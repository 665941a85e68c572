"""A fake vLLM OpenAI-compatible server for tests, backed by tinkerd's own `LocalSampler`.

Serves what `VllmSampler` uses, with vLLM's status codes and error shapes:
`/health`, `/v1/models`, `/v1/load_lora_adapter` (400 if the name is already loaded, 404 if the
folder has no adapter), `/v1/unload_lora_adapter` (404 for an unknown name) and `/v1/completions`
(token-id prompts, n, seed, temperature/top_p/top_k, stop / stop_token_ids / ignore_eos, logprobs
with `token_id:N` tokens, `token_ids`, prompt_logprobs; 404 for an unknown model name).

At most `max_loras` adapters stay registered: loading one more forgets the least recently used,
as a vLLM replica that restarted or lost it would, so later requests for it answer 404. Tests
inject failures with `fail_next(status, times, route)` and read every call in `calls`.
"""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tinkerd.engine.adapter_files import read_peft_adapter
from tinkerd.engine.interface import AdapterRef
from tinkerd.engine.sampler import LocalSampler
from tinkerd.local_server import free_port
from tinkerd.protocol.types import BadRequest, SamplingParams


def error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)


class FakeVllm:
    def __init__(self, sampler: LocalSampler, served_name: str, base_model: str, max_loras: int = 4) -> None:
        self.sampler = sampler
        self.served_name = served_name  # vLLM's name for the base model
        self.base_model = base_model  # the sampler runtime's name
        self.max_loras = max_loras
        self.loras: collections.OrderedDict[str, str] = collections.OrderedDict()  # name -> path, LRU order
        self.calls: list[tuple[str, dict]] = []
        self.failures: dict[str, collections.deque[int]] = collections.defaultdict(collections.deque)
        self._sampling = threading.Lock()  # LocalSampler runs one request at a time here
        self.app = self._build()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # test controls

    def fail_next(self, status: int, times: int = 1, route: str = "/v1/completions") -> None:
        self.failures[route].extend([status] * times)

    def forget(self, name: str) -> None:
        """Drop a registered adapter as a restarted replica would (the next request for it answers 404)."""
        self.loras.pop(name, None)

    def routes_called(self, route: str) -> list[dict]:
        return [body for r, body in self.calls if r == route]

    def start(self) -> "FakeVllm":
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.time() + 30
        while not self._server.started:
            if time.time() > deadline:
                raise RuntimeError("fake vLLM did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)

    # the app

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def inject(request: Request, call_next):
            body = await request.json() if request.method == "POST" else {}
            self.calls.append((request.url.path, body))
            queued = self.failures.get(request.url.path)
            if queued:
                status = queued.popleft()
                return error(status, f"injected failure {status}", "InternalServerError" if status >= 500 else "Error")
            return await call_next(request)

        @app.get("/health")
        async def health():
            return {}

        @app.get("/v1/models")
        async def models():
            cards = [{"id": self.served_name, "object": "model", "root": self.base_model}]
            cards += [{"id": name, "object": "model", "root": path, "parent": self.served_name}
                      for name, path in self.loras.items()]
            return {"object": "list", "data": cards}

        @app.post("/v1/load_lora_adapter")
        async def load(request: Request):
            body = await request.json()
            name, path = body.get("lora_name"), body.get("lora_path")
            if not name or not path:
                return error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
            if name in self.loras:
                return error(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
            if not (Path(path) / "adapter_config.json").is_file():
                return error(404, f"No adapter found for {path}", "NotFoundError")
            spec, state = read_peft_adapter(Path(path))
            with self._sampling:
                runtime = self.sampler.runtimes[self.base_model]
                runtime.lora.load(f"dir:{path}", spec, state)  # the key LocalSampler uses for this folder
            self.loras[name] = path
            while len(self.loras) > self.max_loras:
                self._evict(self.loras.popitem(last=False)[1])
            return JSONResponse(f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload(request: Request):
            name = (await request.json()).get("lora_name")
            if name not in self.loras:
                return error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
            self._evict(self.loras.pop(name))
            return JSONResponse(f"Success: LoRA adapter '{name}' removed successfully.")

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            model = body.get("model")
            if model == self.served_name:
                uri = None
            elif model in self.loras:
                self.loras.move_to_end(model)
                uri = self.loras[model]
            else:
                return error(404, f"The model `{model}` does not exist.", "NotFoundError")
            try:
                choices, prompt_lp = await _in_thread(self._complete, body, uri)
            except BadRequest as exc:
                return error(400, str(exc), "BadRequestError")
            for choice in choices:
                choice["prompt_logprobs"] = prompt_lp
            return {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()), "model": model,
                    "choices": choices, "usage": {"prompt_tokens": len(body["prompt"])}}

        return app

    def _evict(self, path: str) -> None:
        if not any(p == path for p in self.loras.values()):
            with self._sampling:
                self.sampler.runtimes[self.base_model].lora.remove(f"dir:{path}")

    def _complete(self, body: dict, uri: str | None) -> tuple[list[dict], list | None]:
        params = SamplingParams(
            max_tokens=body.get("max_tokens", 16), temperature=body.get("temperature", 1.0),
            top_k=body.get("top_k") or -1, top_p=body.get("top_p", 1.0), seed=body.get("seed"),
            stop_strings=tuple(body.get("stop") or ()), stop_tokens=tuple(body.get("stop_token_ids") or ()),
            stop_at_eos=not body.get("ignore_eos", False))
        top_k = body.get("logprobs") or 0
        prompt_k = body.get("prompt_logprobs")
        with self._sampling:
            result = self.sampler.sample(
                AdapterRef(uri=uri, base_model=self.base_model), body["prompt"], body.get("n", 1), params,
                prompt_logprobs=prompt_k is not None, topk_prompt_logprobs=prompt_k or 0, topk_sample_logprobs=top_k)
        choices = []
        for i, seq in enumerate(result.sequences):
            top = None
            if top_k:
                ids, lps = seq.topk_logprobs
                top = [{f"token_id:{int(t)}": float(lp) for t, lp in zip(ids[j], lps[j])} for j in range(len(ids))]
            choices.append({
                "index": i, "text": "", "finish_reason": seq.stop_reason, "stop_reason": None,
                "token_ids": list(seq.tokens),
                "logprobs": {"tokens": [f"token_id:{t}" for t in seq.tokens], "token_logprobs": list(seq.logprobs),
                             "top_logprobs": top, "text_offset": [0] * len(seq.tokens)},
            })
        prompt_lp = None
        if prompt_k is not None:
            prompt_lp = [None]
            for t in range(1, len(body["prompt"])):
                entry = {str(body["prompt"][t]): {"logprob": result.prompt_logprobs[t], "rank": None}}
                if prompt_k:
                    ids, lps = result.topk_prompt_logprobs
                    for rank, (tok, lp) in enumerate(zip(ids[t], lps[t]), start=1):
                        entry.setdefault(str(int(tok)), {"logprob": float(lp), "rank": rank})
                prompt_lp.append(entry)
        return choices, prompt_lp


async def _in_thread(fn, *args):
    import asyncio

    return await asyncio.to_thread(fn, *args)
