"""The continuous-batching sampler on a tiny random model (fp32): exactness, seeds, stops, logprobs."""

import math

import numpy as np
import pytest
import torch

from tinkerd.engine.interface import AdapterRef, AdapterSpec, SampleTask
from tinkerd.engine.sampler import LocalSampler
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.protocol.types import BadRequest, Datum, ForwardBackwardCall, SamplingParams
from tests.conftest import make_tiny_runtime

BASE = AdapterRef(None, "tiny")


class LetterTokenizer:
    """Token i decodes to one letter, so stop strings can span tokens."""

    def decode(self, tokens):
        return "".join(chr(ord("a") + t % 26) for t in tokens)


@pytest.fixture
def engine():
    rt = make_tiny_runtime()
    rt.tokenizer = LetterTokenizer()
    trainer = LocalTrainer({"tiny": rt})
    for i, name in enumerate(("a1", "a2")):
        trainer.create_adapter(name, "tiny", AdapterSpec(rank=4, seed=i))
        for pname, p in rt.lora.named_parameters(name):
            if pname.endswith("lora_B"):
                p.data.normal_(std=0.3, generator=torch.Generator().manual_seed(i))
    refs = {name: trainer.snapshot_for_sampler(name) for name in ("a1", "a2")}
    return trainer, LocalSampler({"tiny": rt}), refs


def _run_together(sampler, requests):
    for request in requests:
        sampler.submit(request)
    results = {}
    while len(results) < len(requests):
        for request_id, outcome in sampler.step():
            results[request_id] = outcome
    return results


def _full_logprobs(runtime, key, tokens):
    t = torch.tensor([tokens])
    with torch.no_grad():
        logp = runtime.logits(t, torch.ones_like(t), [key])[0].log_softmax(-1)
    return logp[:-1].gather(-1, t[0, 1:, None])[:, 0]


def test_batched_kv_cache_decode_equals_full_recomputation(engine):
    trainer, sampler, refs = engine
    runtime = trainer.runtimes["tiny"]
    params = SamplingParams(max_tokens=9, seed=5, stop_at_eos=False)
    requests = [SampleTask("short", refs["a1"], [3, 4], 2, params),
                SampleTask("long", BASE, [9, 8, 7, 6, 5, 4, 3], 1, params),
                SampleTask("mid", refs["a2"], [11, 12, 13, 14], 3, SamplingParams(max_tokens=4, seed=1, stop_at_eos=False))]
    results = _run_together(sampler, requests)
    for request in requests:
        key = None if request.adapter.uri is None else request.adapter.uri[len("mem://"):]
        for seq in results[request.request_id].sequences:
            lp = _full_logprobs(runtime, key, request.prompt + seq.tokens)[len(request.prompt) - 1:]
            np.testing.assert_allclose(seq.logprobs, lp.numpy(), atol=5e-5)  # fp32 reduction order


def test_same_seed_same_tokens_alone_or_in_a_batch_and_samples_differ(engine):
    _, sampler, refs = engine
    params = SamplingParams(max_tokens=12, seed=42, stop_at_eos=False)
    alone = sampler.sample(refs["a1"], [3, 4, 5], 4, params)
    assert len({tuple(s.tokens) for s in alone.sequences}) > 1
    crowd = _run_together(sampler, [
        SampleTask("other", refs["a2"], [7, 7, 7, 7, 7, 7], 3, SamplingParams(max_tokens=5, seed=1)),
        SampleTask("me", refs["a1"], [3, 4, 5], 4, params),
        SampleTask("base", BASE, [1, 2], 2, SamplingParams(max_tokens=20, seed=9, stop_at_eos=False))])
    assert [s.tokens for s in crowd["me"].sequences] == [s.tokens for s in alone.sequences]


def test_two_adapters_in_one_batch_match_each_alone(engine):
    _, sampler, refs = engine
    params = SamplingParams(max_tokens=10, seed=3, stop_at_eos=False)
    alone = {name: sampler.sample(ref, [5, 6, 7], 2, params) for name, ref in refs.items()}
    together = _run_together(sampler, [SampleTask(name, ref, [5, 6, 7], 2, params) for name, ref in refs.items()])
    for name in refs:
        assert [s.tokens for s in together[name].sequences] == [s.tokens for s in alone[name].sequences]
    assert alone["a1"].sequences[0].tokens != alone["a2"].sequences[0].tokens


def test_stops_include_the_stop_and_max_tokens_gives_length(engine):
    _, sampler, _ = engine
    greedy = SamplingParams(max_tokens=12, temperature=0, stop_at_eos=False)
    free = sampler.sample(BASE, [7, 8], 1, greedy).sequences[0]
    assert len(free.tokens) == 12 and free.stop_reason == "length"
    # a stop string spanning tokens 2 and 3
    text = LetterTokenizer().decode(free.tokens)
    stop = text[2:4]
    end = text.index(stop) + len(stop)
    by_string = sampler.sample(BASE, [7, 8], 1, SamplingParams(max_tokens=12, temperature=0, stop_at_eos=False,
                                                              stop_strings=(stop,))).sequences[0]
    assert by_string.tokens == free.tokens[:end] and by_string.stop_reason == "stop"
    # a stop token id
    first = free.tokens.index(free.tokens[4])
    by_token = sampler.sample(BASE, [7, 8], 1, SamplingParams(max_tokens=12, temperature=0, stop_at_eos=False,
                                                             stop_tokens=(free.tokens[4],))).sequences[0]
    assert by_token.tokens == free.tokens[:first + 1] and by_token.stop_reason == "stop"


def test_prompt_logprobs_match_the_trainer_and_topk_rows_are_sorted(engine):
    trainer, sampler, refs = engine
    prompt = [3, 9, 4, 1, 5, 9, 2, 6]
    out = sampler.sample(refs["a1"], prompt, 1, SamplingParams(max_tokens=1, seed=0), prompt_logprobs=True,
                         topk_prompt_logprobs=5)
    assert math.isnan(out.prompt_logprobs[0]) and len(out.prompt_logprobs) == len(prompt)
    tokens = np.array(prompt, dtype=np.int64)
    forward = trainer.forward_backward(ForwardBackwardCall("a1", 1, "cross_entropy", {}, True, [Datum(
        tokens[:-1], {"target_tokens": tokens[1:], "weights": np.zeros(len(prompt) - 1, dtype=np.float32)})]))
    np.testing.assert_allclose(out.prompt_logprobs[1:], forward.outputs[0]["logprobs"], atol=1e-5)
    ids, lps = out.topk_prompt_logprobs
    assert ids.shape == lps.shape == (len(prompt), 5)
    assert (lps[0] == -99999.0).all()
    assert (np.diff(lps[1:], axis=1) <= 0).all()
    assert (lps[1:, 0] >= np.array(out.prompt_logprobs[1:]) - 1e-5).all()  # the best is at least the actual token


def test_cancel_frees_rows_and_bad_requests_are_named(engine):
    _, sampler, _ = engine
    sampler.submit(SampleTask("long", BASE, [1, 2, 3], 4, SamplingParams(max_tokens=40, stop_at_eos=False)))
    sampler.step()
    assert sampler.active_rows() == 4
    sampler.cancel("long")
    assert sampler.step() == [] and sampler.active_rows() == 0 and not sampler.has_work()
    with pytest.raises(BadRequest, match="prompt: token id 999"):
        sampler.sample(BASE, [999], 1, SamplingParams())
    with pytest.raises(BadRequest, match="exceeds the model's context of 64"):
        sampler.sample(BASE, [1] * 60, 1, SamplingParams(max_tokens=10))
    with pytest.raises(BadRequest, match="sampling_params.top_p"):
        SamplingParams(top_p=0)


def test_last_n_targets_alt_tokens_and_sampled_topk_agree_with_full_recomputation(engine):
    trainer, sampler, refs = engine
    runtime = trainer.runtimes["tiny"]
    prompt = [3, 9, 4, 1, 5, 9, 2, 6]
    targets = np.array([[5, -1], [7, 8], [-1, -1], [1, 2], [0, 3], [9, 9], [4, -1]], dtype=np.int64)
    out = sampler.sample(refs["a2"], prompt, 2, SamplingParams(max_tokens=6, seed=4, stop_at_eos=False),
                         prompt_logprobs=True, topk_prompt_logprobs=3, prompt_logprobs_last_n=3,
                         target_prompt_logprobs=targets, prompt_alt_tokens_k=4, topk_sample_logprobs=2)
    full = torch.tensor([prompt])
    with torch.no_grad():
        logp = runtime.logits(full, torch.ones_like(full), ["a2"])[0, :-1].log_softmax(-1)  # row i scores prompt[i+1]
    # last_n = 3: only the last three positions are scored, in both the logprobs and the top-k rows.
    assert all(math.isnan(x) for x in out.prompt_logprobs[:5])
    np.testing.assert_allclose(out.prompt_logprobs[5:], logp[4:].gather(-1, torch.tensor(prompt[5:])[:, None])[:, 0],
                               atol=1e-5)
    ids, lps = out.topk_prompt_logprobs
    assert (lps[:5] == -99999.0).all() and (np.diff(lps[5:], axis=1) <= 0).all()
    np.testing.assert_allclose(lps[5:], logp[4:].topk(3).values.numpy(), atol=1e-5)
    # target ids: scored at every position (no last_n), 0.0 where -1 asked for nothing.
    want = logp.gather(-1, torch.from_numpy(targets).clamp(min=0)).numpy()
    np.testing.assert_allclose(out.target_prompt_logprobs, np.where(targets >= 0, want, 0.0), atol=1e-5)
    # alternative draws: k per position, their logprobs are the model's.
    alt_ids, alt_lps = out.prompt_alt_tokens
    assert alt_ids.shape == alt_lps.shape == (len(prompt) - 1, 4)
    np.testing.assert_allclose(alt_lps, logp.gather(-1, torch.from_numpy(alt_ids)).numpy(), atol=1e-5)
    # top-k at every sampled position: sorted, and the sampled token's logprob never beats the best.
    for seq in out.sequences:
        top_ids, top_lps = seq.topk_logprobs
        assert top_ids.shape == top_lps.shape == (len(seq.tokens), 2)
        assert (top_lps[:, 0] >= top_lps[:, 1]).all() and (top_lps[:, 0] >= np.array(seq.logprobs) - 1e-5).all()
    with pytest.raises(BadRequest, match=r"prompt_logprobs_last_n must be in \[1, len\(prompt\) - 1 = 7\]"):
        sampler.sample(BASE, prompt, 1, SamplingParams(), prompt_logprobs=True, prompt_logprobs_last_n=8)
    with pytest.raises(BadRequest, match="target_prompt_logprobs: expected shape"):
        sampler.sample(BASE, prompt, 1, SamplingParams(), target_prompt_logprobs=targets[:3])


def test_prompt_scoring_requests_prefilled_together_equal_each_alone(engine):
    """Several prompt-scoring requests of different lengths and adapters admitted in one step share a
    forward; each gets what it would get alone (prompt logprobs, top-k, and its sampled tokens)."""
    _, sampler, refs = engine
    asks = [(refs["a1"], [3, 9, 4, 1, 5, 9, 2, 6]), (refs["a2"], [7, 2]), (BASE, [5, 8, 1, 1, 4])]
    params = SamplingParams(max_tokens=3, seed=5, stop_at_eos=False)
    alone = [sampler.sample(ref, prompt, 2, params, prompt_logprobs=True, topk_prompt_logprobs=3)
             for ref, prompt in asks]
    requests = [SampleTask(f"r{i}", ref, prompt, 2, params, prompt_logprobs=True, topk_prompt_logprobs=3)
                for i, (ref, prompt) in enumerate(asks)]
    prefills = []
    original = sampler._prefill
    sampler._prefill = lambda runtime, items: prefills.append(len(items)) or original(runtime, items)
    together = _run_together(sampler, requests)
    assert prefills == [3]
    for want, got in zip(alone, [together[f"r{i}"] for i in range(3)]):
        np.testing.assert_allclose(got.prompt_logprobs[1:], want.prompt_logprobs[1:], atol=1e-5)
        np.testing.assert_allclose(got.topk_prompt_logprobs[1], want.topk_prompt_logprobs[1], atol=1e-5)
        assert [s.tokens for s in got.sequences] == [s.tokens for s in want.sequences]


def test_the_two_level_cdf_inversion_draws_what_the_full_float64_cdf_draws():
    """invert_cdf against the one-level reference (searchsorted in the float64 cumulative sum over the whole
    vocabulary): the same token for every u, for a vocabulary that is not a multiple of the block, rows with
    masked (zero-probability) tokens, and u at the extremes; never a zero-probability token."""
    from tinkerd.engine.sampler import CDF_BLOCK, invert_cdf

    gen = torch.Generator().manual_seed(0)
    vocab = 3 * CDF_BLOCK + 17
    logits = torch.randn(6, vocab, generator=gen) * 4
    logits[1, CDF_BLOCK:] = float("-inf")  # one block of mass, then nothing (the padded tail too)
    logits[2, ::2] = float("-inf")  # every other token masked
    logits[3, :-1] = float("-inf")  # all mass on the last token, in the padded block
    logits[4, 5] = 40.0  # nearly one-hot
    probs = logits.softmax(-1)
    cdf = probs.double().cumsum(-1)
    for u in [torch.rand(6, generator=gen, dtype=torch.float64) for _ in range(200)] + [
            torch.zeros(6, dtype=torch.float64), torch.full((6,), 1 - 2 ** -53, dtype=torch.float64)]:
        got = invert_cdf(probs, u)
        want = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=vocab - 1)
        assert (probs.gather(1, got[:, None]) > 0).all(), (u, got)
        same = got == want
        # rounding may move a draw that lands within float64 epsilon of a boundary by one token, no further
        assert same.all() or ((got - want).abs()[~same] <= 1).all(), (u, got, want)
    counts = torch.bincount(torch.cat([invert_cdf(probs[4:5], torch.rand(1, generator=gen, dtype=torch.float64))
                                       for _ in range(300)]), minlength=vocab)
    assert counts[5] >= 290  # the nearly one-hot row draws its token
