"""kill -9 of a `tinkerd serve --engine ray` front end under an SDK loop, its engine actor living on in
the cluster: the restarted front end re-attaches, rebuilds the run in the actor from its snapshot and
journal, and the unchanged SDK loop finishes equal to an uninterrupted run (the real embedded model).

Tier 1: needs the ray extra (`make test-ray`); skipped when ray is not installed.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.ray.cluster import RAY_ENV, ensure_ray

pytestmark = [pytest.mark.ray, pytest.mark.slow]

import tinker  # noqa: E402

from tests.e2e.conftest import EMBEDDED, ServerProcess  # noqa: E402
from tests.e2e.test_crash_recovery_e2e import KILL_AT, _loop  # noqa: E402
from tinkerd.engine.ray_engine import remove  # noqa: E402
from tinker import types  # noqa: E402


def test_kill_9_of_the_front_end_the_actor_lives_on_and_the_sdk_loop_finishes_exactly(tmp_path, monkeypatch):
    address = ensure_ray()
    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    flags = ("--engine", "ray", "--ray-address", address, "--snapshot-every", "2")
    server = ServerProcess(tmp_path / "data", *flags)
    restarted = None
    try:
        service = tinker.ServiceClient(base_url=server.url, api_key="tml-ray-crash")
        training = service.create_lora_training_client(base_model=EMBEDDED, rank=4, seed=3).result()
        prompt = types.ModelInput.from_ints(training.get_tokenizer().encode("Tell me about the sea."))
        kill_now, outcome = threading.Event(), {}

        def run() -> None:
            try:
                outcome["result"] = _loop(training, prompt, lambda step: step == KILL_AT and kill_now.set())
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                outcome["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert kill_now.wait(600), outcome
        deadline = time.time() + 60
        while server.log_tail(200_000).count("POST /api/v1/optim_step 200") <= KILL_AT and time.time() < deadline:
            time.sleep(0.02)
        server.kill()  # the front end dies; the detached actor and the run it holds stay
        restarted = ServerProcess(tmp_path / "data", *flags, port=server.port)
        thread.join(600)
        assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
        log = restarted.log_tail(200_000)
        assert "attached to" in log and "recovering training run" in log, log[-3000:]
        assert "(0 still awaited by clients)" not in log

        reference = _loop(service.create_lora_training_client(base_model=EMBEDDED, rank=4, seed=3).result(), prompt)
        assert outcome["result"] == reference
    finally:
        (restarted or server).stop()
        remove("embedded@auto")  # the actor `serve --engine ray` started for the embedded model
