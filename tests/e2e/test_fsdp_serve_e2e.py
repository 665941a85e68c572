"""`tinkerd serve --trainer-ranks 2` on a tiny model folder, driven by the official SDK: training runs in
an FSDP2 group of 2 rank processes, sampling in the server on published adapter folders."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from tinker import types

from tests.test_cli import _tiny_model_folder
from tinkerd.local_server import LocalServer

TOKENS = [3, 5, 7, 9, 42, 42, 42, 42, 42]


def test_a_two_rank_trainer_group_serves_training_and_sampling_through_the_sdk(tmp_path):
    folder = _tiny_model_folder(tmp_path / "tiny")
    with (LocalServer(tmp_path / "data", "--base-model", str(folder), "--trainer-ranks", "2", "--dtype", "fp32",
                      "--eager-norms", "--threads", "1") as server,
          tinker.ServiceClient(base_url=server.url, api_key="tml-fsdp") as service):  # closed before the stop
        assert "FSDP2 trainer group of 2 ranks" in server.log_tail()
        training = service.create_lora_training_client(base_model=str(folder.resolve()), rank=4, seed=0).result()
        datum = types.Datum(model_input=types.ModelInput.from_ints(TOKENS[:-1]),
                            loss_fn_inputs={"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)})
        losses = []
        for _ in range(4):
            fwd = training.forward_backward([datum], "cross_entropy")
            training.optim_step(types.AdamParams(learning_rate=0.05)).result()
            losses.append(fwd.result().metrics["loss:sum"])
        assert losses[-1] < 0.5 * losses[0], losses

        sampler = training.save_weights_and_get_sampling_client().result()
        prompt = types.ModelInput.from_ints(TOKENS[:4])
        sample = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=4, temperature=0.0)).result().sequences[0]
        assert sample.tokens == [42, 42, 42, 42]
        # the sampler's copy of the base plus the published adapter scores like the sharded trainer
        tokens = TOKENS[:4] + sample.tokens
        scored = training.forward([types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
            "target_tokens": tokens[1:], "weights": [0.0] * (len(tokens) - 1)})], "cross_entropy").result()
        np.testing.assert_allclose(scored.loss_fn_outputs[0]["logprobs"].tolist()[3:], sample.logprobs, atol=1e-4)


def test_trainer_ranks_are_refused_where_no_group_can_run(tmp_path):
    from tinkerd.cli import _parser, serve

    for extra in (["--trainer-ranks", "0"], ["--trainer-ranks", "2", "--engine", "ray"],
                  ["--trainer-ranks", "2", "--device", "cuda"]):
        args = _parser().parse_args(["serve", "--data-dir", str(tmp_path), *extra])
        with pytest.raises(SystemExit, match="--trainer-ranks"):
            serve(args)
