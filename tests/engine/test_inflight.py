"""Inflight sampler targets on the embedded engine (tiny random model): one mutable target per run, adopted by a
generation in flight at its next decode step, overwritten in place so memory stays flat."""

import pytest
import torch

from tinkerd.engine.interface import AdapterSpec, SampleTask
from tinkerd.engine.sampler import LocalSampler
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.protocol.types import SamplingParams
from tests.conftest import make_tiny_runtime

PROMPT = [3, 4, 5, 6]


@pytest.fixture
def engine():
    runtime = make_tiny_runtime()
    trainer = LocalTrainer({"tiny": runtime})
    trainer.create_adapter("run", "tiny", AdapterSpec(rank=4, seed=0))
    _new_weights(runtime, 1)
    return trainer, LocalSampler({"tiny": runtime}), runtime


def _new_weights(runtime, seed):
    """Stand-in for an optimizer step: the run's LoRA B matrices get new random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in runtime.lora.named_parameters("run"):
            if name.endswith("lora_B"):
                p.normal_(std=0.5, generator=generator)


def _finish(sampler, request_id):
    while True:
        for done, outcome in sampler.step():
            if done == request_id:
                assert not isinstance(outcome, Exception), outcome
                return outcome


def _greedy(sampler, ref, tokens=8):
    return sampler.sample(ref, PROMPT, 1, SamplingParams(max_tokens=tokens, temperature=0.0, stop_at_eos=False)
                          ).sequences[0].tokens


def test_a_generation_in_flight_adopts_the_new_weights_at_its_next_decode_step(engine):
    trainer, sampler, runtime = engine
    w1 = trainer.snapshot_for_sampler("run")
    inflight = trainer.publish_inflight("run")
    sampler.submit(SampleTask("long", inflight, PROMPT, 1, SamplingParams(max_tokens=14, seed=3, stop_at_eos=False)))
    before = 5
    for _ in range(before):  # prefill, then one token drawn per step
        assert sampler.step() == []
    _new_weights(runtime, 2)
    w2 = trainer.publish_inflight("run")
    w2_copy = _frozen_copy(trainer, runtime, "w2")
    sequence = _finish(sampler, "long").sequences[0]
    tokens, logprobs = sequence.tokens, torch.tensor(sequence.logprobs)
    assert len(tokens) == 14 and w2.uri == inflight.uri

    # the same generation computed another way: the first `before` tokens and the one drawn next from W1's
    # logits, prefilled at once under a W1 copy; every later token's logits under a W2 copy, on that cache
    decoder = sampler.decoders["tiny"]
    cache = decoder.new_cache()
    with torch.no_grad():
        logits, _ = decoder.prefill(cache, [PROMPT + tokens[:before]], [w1.memory_key])
        expected = [logits.log_softmax(-1)[0, tokens[before]]]
        for position in range(before, len(tokens) - 1):
            logits = decoder.decode(cache, torch.tensor([tokens[position]]), [w2_copy])
            expected.append(logits.log_softmax(-1)[0, tokens[position + 1]])
    expected = torch.stack(expected)
    assert torch.allclose(logprobs[before:], expected, atol=1e-4, rtol=0), (logprobs[before:], expected)

    # and the switch is real: W1 alone gives those tokens other logprobs
    cache = decoder.new_cache()
    with torch.no_grad():
        logits, _ = decoder.prefill(cache, [PROMPT + tokens[:-1]], [w1.memory_key], all_positions=True)
    w1_only = logits[0].log_softmax(-1)[len(PROMPT) - 1:].gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    assert torch.allclose(logprobs[:before + 1], w1_only[:before + 1], atol=1e-4, rtol=0)
    assert (logprobs[before + 1:] - w1_only[before + 1:]).abs().max() > 1e-2


def _frozen_copy(trainer, runtime, label):
    key = f"run@{label}"
    runtime.lora.clone("run", key)
    return key


def test_inflight_clients_sample_the_newest_save_and_snapshots_keep_theirs(engine):
    trainer, sampler, runtime = engine
    w1_snapshot = trainer.snapshot_for_sampler("run")
    first_inflight = trainer.publish_inflight("run")
    w1_tokens = _greedy(sampler, w1_snapshot)
    assert _greedy(sampler, first_inflight) == w1_tokens
    _new_weights(runtime, 2)
    second_inflight = trainer.publish_inflight("run")
    w2_tokens = _greedy(sampler, _ref(runtime, _frozen_copy(trainer, runtime, "w2")))
    assert w2_tokens != w1_tokens
    assert _greedy(sampler, first_inflight) == w2_tokens  # the old client, with no new client asked for
    assert _greedy(sampler, second_inflight) == w2_tokens
    assert _greedy(sampler, w1_snapshot) == w1_tokens


def _ref(runtime, key):
    from tinkerd.engine.interface import AdapterRef

    return AdapterRef.in_memory(key, runtime.name)


def test_a_hundred_inflight_saves_leave_memory_flat(engine):
    trainer, sampler, runtime = engine
    lora = runtime.lora
    ref = trainer.publish_inflight("run")
    key = ref.memory_key
    pointers = {name: (w.A.data_ptr(), w.B.data_ptr()) for name, m in lora.modules.items()
                if (w := m.adapters.get(key)) is not None}
    keys, size = set(lora.specs), lora.nbytes(key)
    sampler.submit(SampleTask("pinned", ref, PROMPT, 2, SamplingParams(max_tokens=40, seed=1, stop_at_eos=False)))
    sampler.step()  # a generation holds the target while it is overwritten
    for seed in range(100):
        _new_weights(runtime, 10 + seed)
        assert trainer.publish_inflight("run") == ref
    assert set(lora.specs) == keys and lora.nbytes(key) == size
    assert pointers == {name: (w.A.data_ptr(), w.B.data_ptr()) for name, m in lora.modules.items()
                        if (w := m.adapters.get(key)) is not None}
    last = {name: m.adapters["run"].B.detach().clone() for name, m in lora.modules.items() if "run" in m.adapters}
    assert all(torch.equal(lora.modules[name].adapters[key].B, b) for name, b in last.items())
    _finish(sampler, "pinned")


def test_dropping_the_run_frees_its_inflight_target(engine):
    trainer, sampler, runtime = engine
    key = trainer.publish_inflight("run").memory_key
    trainer.drop_adapter("run")
    assert key not in runtime.lora.specs
