"""The app on the tiny model behind a real uvicorn server (in a thread), with a sampler slowed to 50 ms a step: a
client that goes away cancels its rows while they are surely still decoding, and OpenAI requests decode in the
same steps as the SDK's (mixed adapters in one batch)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn

from tests.conftest import make_tiny_runtime
from tests.openai_tokenizer import write_char_tokenizer
from tinkerd.control.plane import ServerConfig
from tinkerd.engine.sampler import LocalSampler
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.local_server import free_port
from tinkerd.server.app import create_app

HEADERS = {"Authorization": "Bearer tml-owner"}
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}


class SlowSampler(LocalSampler):
    def __init__(self, runtimes):
        super().__init__(runtimes)
        self.steps = 0

        self.batch_adapters: list[set] = []  # per step: the adapters of the rows decoding together

    def step(self):
        time.sleep(0.05)
        self.steps += 1
        self.batch_adapters.append({row.pending.adapter_key for b in self.batches.values() for row in b.rows})
        return super().step()


@pytest.fixture
def served(tmp_path):
    runtimes = {"tiny": make_tiny_runtime()}
    sampler = SlowSampler(runtimes)
    app = create_app(ServerConfig(data_dir=tmp_path), LocalTrainer(runtimes), sampler)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    app.state.tinkerd.tokenizers.folders["tiny"] = write_char_tokenizer(tmp_path / "tokenizer")
    yield f"http://127.0.0.1:{server.config.port}", app.state.tinkerd, sampler
    server.should_exit = True
    thread.join(timeout=10)


def _wait_idle(st, sampler, seconds=10.0) -> None:
    deadline = time.time() + seconds
    while (st.scheduler.pending_samples or sampler.has_work()) and time.time() < deadline:
        time.sleep(0.02)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_cancels_its_rows(served, stream):
    url, st, sampler = served
    with httpx.Client(base_url=url, headers=HEADERS, timeout=30) as client:
        if stream:
            with client.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as r:
                chunks = (line for line in r.iter_lines() if line.startswith("data: {"))
                for _ in range(3):  # the role, then two tokens
                    next(chunks)
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/chat/completions", json=BODY, timeout=0.3)
    _wait_idle(st, sampler)
    assert st.scheduler.pending_samples == 0 and not sampler.has_work()
    assert sampler.steps < 41  # 40 tokens would take 41 steps (2 s): the rows went before the end
    assert st.scheduler.metrics.tokens_sampled._value.get() == 0  # counted only for requests that finish

    done = httpx.post(f"{url}/v1/chat/completions", json={**BODY, "max_tokens": 5, "seed": 1}, headers=HEADERS,
                      timeout=30)  # seeded: unseeded, the random tiny model may draw its EOS before 5 tokens
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 5


def test_openai_and_sdk_requests_decode_in_the_same_steps_with_their_own_adapters(served, tmp_path):
    from tests.app_client import OWNER_KEY
    from tests.server.test_openai_routes import PROMPT, checkpoint

    url, st, sampler = served
    path = checkpoint(None, tmp_path, st=st)
    sdk_body = {"prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]}, "num_samples": 1,
                "base_model": "tiny", "sampling_params": {"max_tokens": 30, "temperature": 1.0, "seed": 1, "stop": []}}
    with httpx.Client(base_url=url, timeout=30) as client:
        future = client.post("/api/v1/asample", json=sdk_body, headers=OWNER_KEY).json()["request_id"]
        done = client.post("/v1/completions", headers=HEADERS,
                           json={"model": path, "prompt": PROMPT, "max_tokens": 20, "seed": 1}).json()
        sdk = client.post("/api/v1/retrieve_future", json={"request_id": future}, headers=OWNER_KEY).json()
    assert done["usage"]["completion_tokens"] == 20 and len(sdk["sequences"][0]["tokens"]) == 30
    mixed = [adapters for adapters in sampler.batch_adapters if None in adapters and len(adapters) == 2]
    assert len(mixed) >= 10  # the checkpoint's rows decoded beside the base model's, step after step
