import math

import numpy as np
import pytest
import torch

from tinkerd.engine.interface import AdapterRef, AdapterSpec
from tinkerd.engine.sampler import LocalSampler
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.protocol.types import BadRequest, Datum, ForwardBackwardCall, SamplingParams
from tests.conftest import make_tiny_runtime

BASE = AdapterRef(None, "tiny")


@pytest.fixture
def engine():
    rt = make_tiny_runtime()
    return LocalTrainer({"tiny": rt}), LocalSampler({"tiny": rt})


def test_same_seed_same_tokens_and_samples_differ(engine):
    _, sampler = engine
    params = SamplingParams(max_tokens=12, seed=42, stop_at_eos=False)
    a = sampler.sample(BASE, [3, 4, 5], 4, params)
    b = sampler.sample(BASE, [3, 4, 5], 4, params)
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert len({tuple(s.tokens) for s in a.sequences}) > 1
    assert all(len(s.tokens) == 12 and s.stop_reason == "length" for s in a.sequences)


def test_sample_logprobs_match_trainer_forward(engine):
    trainer, sampler = engine
    trainer.create_adapter("m", "tiny", AdapterSpec(rank=4, seed=3))
    for module in trainer.runtimes["tiny"].lora.modules.values():
        if "m" in module.adapters:
            module.adapters["m"].B.data.normal_(std=0.1)
    ref = trainer.snapshot_for_sampler("m")
    prompt = [3, 4, 5]
    seq = sampler.sample(ref, prompt, 1, SamplingParams(max_tokens=8, seed=1, stop_at_eos=False)).sequences[0]
    full = np.array(prompt + seq.tokens, dtype=np.int64)
    weights = np.zeros(len(full) - 1, dtype=np.float32)
    out = trainer.forward_backward(ForwardBackwardCall("m", 1, "cross_entropy", {}, True, [
        Datum(full[:-1], {"target_tokens": full[1:], "weights": weights})]))
    np.testing.assert_allclose(out.outputs[0]["logprobs"][len(prompt) - 1:], seq.logprobs, atol=1e-4)


def test_greedy_stops_at_stop_token_and_includes_it(engine):
    _, sampler = engine
    greedy = sampler.sample(BASE, [7, 8], 1, SamplingParams(max_tokens=10, temperature=0, stop_at_eos=False)).sequences[0]
    stop_at = greedy.tokens[3]
    first = greedy.tokens.index(stop_at)
    stopped = sampler.sample(BASE, [7, 8], 1, SamplingParams(max_tokens=10, temperature=0, stop_tokens=(stop_at,), stop_at_eos=False))
    seq = stopped.sequences[0]
    assert seq.tokens == greedy.tokens[: first + 1] and seq.stop_reason == "stop"


def test_prompt_logprobs_nan_first(engine):
    _, sampler = engine
    out = sampler.sample(BASE, [3, 4, 5, 6], 1, SamplingParams(max_tokens=1, seed=0), prompt_logprobs=True)
    assert math.isnan(out.prompt_logprobs[0]) and len(out.prompt_logprobs) == 4
    assert all(lp < 0 for lp in out.prompt_logprobs[1:])


def test_bad_prompt_names_field(engine):
    _, sampler = engine
    with pytest.raises(BadRequest, match="prompt: token id 999"):
        sampler.sample(BASE, [999], 1, SamplingParams())
    with pytest.raises(BadRequest, match="sampling_params.top_p"):
        SamplingParams(top_p=0)
