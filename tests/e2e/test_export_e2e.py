"""Weight export through the unmodified SDK against a real fp32 tinkerd process: train, save_weights_external,
get_external_weights_urls, download with plain urllib (no key), load with PEFT on the base model, and
compare its logprobs with what the server's forward returns; then copy_weights."""

from __future__ import annotations

import json
import urllib.request

import pytest
import tinker
import torch
from peft import PeftModel
from tinker import types
from transformers import AutoModelForCausalLM

from tests.e2e.conftest import EMBEDDED, MODEL_CACHE, ServerProcess

pytestmark = pytest.mark.slow


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def test_exported_adapter_loads_in_peft_and_matches_the_server(tmp_path):
    with (ServerProcess(tmp_path / "data", "--dtype", "fp32") as server,
          tinker.ServiceClient(base_url=server.url, api_key="tml-export-e2e") as service):  # closed before the stop
        training = service.create_lora_training_client(base_model=EMBEDDED, rank=8, seed=0).result()
        tokenizer = training.get_tokenizer()
        train = [_datum(tokenizer.encode(text)) for text in ("The capital of France is Paris.", "Two plus two is four.")]
        for _ in range(2):
            training.forward_backward(train, "cross_entropy").result()
            training.optim_step(types.AdamParams(learning_rate=2e-3)).result()

        saved = training.save_weights_external("hf-export").result()
        assert saved.path == f"tinker://{training.model_id}/external_weights/hf-export"
        rest = tinker.RestClient(base_url=server.url, api_key="tml-export-e2e")
        urls = rest.get_external_weights_urls(saved.path).result()
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        for rel, url in urls.urls.items():
            with urllib.request.urlopen(url, timeout=30) as response:  # no API key: the URL is the credential
                (adapter / rel).write_bytes(response.read())
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8

        probe = tokenizer.encode("The capital of France is Paris. Two plus two is four, said the teacher.")
        served = training.forward([_datum(probe)], "cross_entropy").result()
        server_logprobs = torch.tensor(served.loss_fn_outputs[0]["logprobs"].tolist())

        copy = rest.copy_weights(saved.path, "archive").result()  # the SDK always sends a destination project
        listed = [c.tinker_path for c in rest.list_checkpoints(training.model_id).result().checkpoints]
        assert copy.startswith(saved.path + "-copy-") and copy in listed

    base = AutoModelForCausalLM.from_pretrained(MODEL_CACHE / EMBEDDED.replace("/", "--"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    inputs, targets = torch.tensor([probe[:-1]]), torch.tensor(probe[1:])
    with torch.no_grad():
        logprobs = model(input_ids=inputs).logits[0].log_softmax(-1).gather(-1, targets[:, None])[:, 0]
        with model.disable_adapter():
            base_logprobs = model(input_ids=inputs).logits[0].log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    assert (logprobs - base_logprobs).abs().max() > 0.05  # training moved the model: the match below means something
    torch.testing.assert_close(logprobs, server_logprobs, atol=1e-3, rtol=0)
