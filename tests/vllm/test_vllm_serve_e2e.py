"""The official SDK against `tinkerd serve --sampler vllm`, pointed at the fake vLLM server (backed
by the embedded sampler on the same model): train, publish, sample, new version, old one retired."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import tinker
from tinker import types

from tests.e2e.conftest import EMBEDDED, MODEL_CACHE, ServerProcess
from tests.e2e.conftest import no_sdk_session_outlives_its_server  # noqa: F401  (autouse here too)
from tests.e2e.conftest import sft_datum
from tests.vllm.fake_vllm import FakeVllm

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of Plorbia?"
GREEDY = types.SamplingParams(max_tokens=20, temperature=0.0, stop=["<|im_end|>"])


@pytest.fixture(scope="module")
def fake():
    from tinkerd.engine.base_models import resolve_base_model
    from tinkerd.engine.runtime import ModelRuntime
    from tinkerd.engine.sampler import LocalSampler

    runtime = ModelRuntime.load(resolve_base_model(None, MODEL_CACHE), dtype="auto")  # as the server picks
    server = FakeVllm(LocalSampler({runtime.name: runtime}), served_name=EMBEDDED, base_model=runtime.name).start()
    yield server
    server.stop()


def test_sdk_trains_and_samples_through_vllm(fake, tmp_path):
    server = ServerProcess(tmp_path / "data", "--sampler", "vllm", "--vllm-url", fake.url, "--vllm-keep-versions", "1")
    try:
        with tinker.ServiceClient(base_url=server.url, api_key="tml-e2e") as service:  # closed before the stop
            training = service.create_lora_training_client(base_model=EMBEDDED, rank=8, seed=0).result()
            tokenizer = training.get_tokenizer()
            prompt = types.ModelInput.from_ints(tokenizer.apply_chat_template(
                [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True, return_dict=False))
            base = service.create_sampling_client(base_model=EMBEDDED).result().sample(prompt, 1, GREEDY).result()
            assert "Vemsk" not in tokenizer.decode(base.sequences[0].tokens)

            datum = sft_datum(tokenizer, QUESTION, "The capital of Plorbia is Vemsk.")
            for _ in range(5):
                training.forward_backward([datum], "cross_entropy").result()
                training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
            first = training.save_weights_and_get_sampling_client().result()
            result = first.sample(prompt, 2, GREEDY).result()
            assert "Vemsk" in tokenizer.decode(result.sequences[0].tokens)
            assert result.sequences[0].tokens == result.sequences[1].tokens

            # The vLLM path's logprobs are the trainer's for the same tokens (the same compute dtype on both sides).
            tokens = prompt.to_ints() + result.sequences[0].tokens
            forward = training.forward([types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                                    loss_fn_inputs={"target_tokens": tokens[1:],
                                                                    "weights": [0.0] * (len(tokens) - 1)})],
                                       "cross_entropy").result()
            trained_lp = forward.loss_fn_outputs[0]["logprobs"].tolist()[prompt.length - 1:]
            assert max(abs(a - b) for a, b in zip(trained_lp, result.sequences[0].logprobs)) < 0.1

            (load,) = fake.routes_called("/v1/load_lora_adapter")
            v1 = Path(load["lora_path"])
            assert load["lora_name"].endswith(f"@{v1.name}") and v1.name.startswith("v1.") and v1.parent.parent == tmp_path / "data" / "adapters"
            assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in v1.iterdir()}

            # A newer version: the old one is unloaded from vLLM and its folder deleted (nothing uses it).
            training.forward_backward([datum], "cross_entropy").result()
            training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
            second = training.save_weights_and_get_sampling_client().result()
            assert "Vemsk" in tokenizer.decode(second.sample(prompt, 1, GREEDY).result().sequences[0].tokens)
            loaded = [b["lora_name"] for b in fake.routes_called("/v1/load_lora_adapter")]
            assert loaded[-1].split("@")[1].startswith("v2.")
            assert not v1.exists()
            assert fake.routes_called("/v1/unload_lora_adapter") == [{"lora_name": load["lora_name"]}]
            with pytest.raises(tinker.RequestFailedError, match="are no longer kept"):
                first.sample(prompt, 1, GREEDY).result()

            prompt_lp = second.compute_logprobs(prompt).result()  # vLLM prompt_logprobs
            assert prompt_lp[0] is None and len(prompt_lp) == prompt.length
            assert all(not math.isnan(x) and x <= 0 for x in prompt_lp[1:])
    finally:
        server.stop()
