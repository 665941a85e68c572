"""kill -9 of the server in the middle of an SDK training loop: the same loop, unchanged, finishes
on the restarted server, and its run equals an uninterrupted one bit for bit (snapshots + journal)."""

from __future__ import annotations

import threading
import time

import pytest
import tinker
from tinker import types

from tests.e2e.conftest import EMBEDDED, ServerProcess

pytestmark = pytest.mark.slow
STEPS, KILL_AT = 5, 2
KILLED_STEP_COPIES = 64  # the killed step trains on 64 copies of its datum: long enough to be caught in flight
ADAM = types.AdamParams(learning_rate=2e-3)


def _loop(training: tinker.TrainingClient, prompt: types.ModelInput, submitted=None) -> dict:
    """A small on-policy loop: sample from the current weights (seeded), train on what was sampled.
    `submitted(step)` is called once a step's forward_backward and optim_step are sent."""
    losses, samples = [], []
    for step in range(STEPS):
        sampler = training.save_weights_and_get_sampling_client().result()
        tokens = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=8, seed=step, temperature=1.0)
                                ).result().sequences[0].tokens
        full = prompt.to_ints() + tokens
        n = prompt.length
        datum = types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                            loss_fn_inputs={"target_tokens": full[1:],
                                            "weights": [0.0] * (n - 1) + [1.0] * (len(full) - n)})
        batch = [datum] * (KILLED_STEP_COPIES if step == KILL_AT else 1)
        fb, opt = training.forward_backward(batch, "cross_entropy"), training.optim_step(ADAM)
        if submitted is not None:
            submitted(step)
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
        samples.append(tokens)
    probe = types.Datum(model_input=types.ModelInput.from_ints(prompt.to_ints()[:-1]),
                        loss_fn_inputs={"target_tokens": prompt.to_ints()[1:], "weights": [1.0] * (prompt.length - 1)})
    logprobs = training.forward([probe], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
    return {"losses": losses, "samples": samples, "logprobs": logprobs}


def kill_mid_loop_and_compare(data_dir, *flags: str) -> str:
    """Start `serve *flags`, run the loop under the SDK, SIGKILL the server while the KILL_AT step's
    forward_backward and optim_step are in flight, restart it on the same port; the unchanged loop must
    finish with the results of an uninterrupted run on the restarted server. Returns the restart's log."""
    server = ServerProcess(data_dir, *flags)
    restarted = None
    try:
        # closed (its session finished) before the restarted server stops; left open, its heartbeat would
        # go on failing against the stopped server for the rest of the test session
        with tinker.ServiceClient(base_url=server.url, api_key="tml-crash") as service:
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
            deadline = time.time() + 60  # the SDK sends in the background: wait until the server has both requests
            while server.log_tail(200_000).count("POST /api/v1/optim_step 200") <= KILL_AT and time.time() < deadline:
                time.sleep(0.02)
            server.kill()  # SIGKILL with a forward_backward and an optim_step in flight
            restarted = ServerProcess(data_dir, *flags, port=server.port)
            thread.join(600)
            assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
            log = restarted.log_tail(200_000)
            assert "recovering training run" in log and "restore point after seq_id" in log, log[-3000:]
            assert "(0 still awaited by clients)" not in log  # the kill caught requests in flight

            reference = _loop(service.create_lora_training_client(base_model=EMBEDDED, rank=4, seed=3).result(),
                              prompt)
            assert outcome["result"] == reference  # losses, sampled tokens and final logprobs, exactly
        return log
    finally:
        (restarted or server).stop()


def test_kill_9_mid_loop_the_sdk_loop_finishes_with_the_uninterrupted_result(tmp_path):
    kill_mid_loop_and_compare(tmp_path / "data", "--snapshot-every", "2")
