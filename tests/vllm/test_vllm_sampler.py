"""`VllmSampler` against the fake vLLM server: parity with the embedded sampler, the model@version
lifecycle, eviction, injected failures and an unreachable server."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tests.vllm.conftest import FAST_RETRY, train_steps
from tinkerd.engine.interface import AdapterRef, SampleTask
from tinkerd.engine.sampler import LocalSampler
from tinkerd.backends.vllm_completions import completion_bodies
from tinkerd.backends.vllm_sampler import RetryPolicy, VllmSampler, VllmUnavailable
from tinkerd.protocol.types import BadRequest, SamplingParams

PROMPT = [3, 5, 7, 9]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, stop_at_eos=False)


def _request(ref: AdapterRef, n: int = 1, params: SamplingParams = GREEDY, **scoring) -> SampleTask:
    return SampleTask(f"r{time.monotonic_ns()}", ref, list(PROMPT), n, params, **scoring)


def _wait_for(condition, seconds: float = 5.0) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.02)


def test_same_tokens_and_logprobs_as_the_embedded_sampler_on_the_same_adapter(trainer, vllm, fake):
    train_steps(trainer, "run", 3)
    published = trainer.snapshot_for_sampler("run")
    assert Path(published.uri).name == f"v1.{trainer.versions.generation}" and published.base_model == "tiny"
    assert {p.name for p in Path(published.uri).iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    inner = trainer.trainer
    local = LocalSampler(inner.runtimes)
    in_memory = inner.snapshot_for_sampler("run")  # the embedded path: same weights, no file

    def both(**kwargs):
        scoring = {k: v for k, v in kwargs.items() if k not in ("n", "params")}
        ours = vllm.sample(_request(published, **kwargs))
        theirs = local.sample(in_memory, PROMPT, kwargs.get("n", 1), kwargs.get("params", GREEDY), **scoring)
        return ours, theirs

    ours, theirs = both()
    assert ours.sequences[0].tokens == theirs.sequences[0].tokens
    np.testing.assert_allclose(ours.sequences[0].logprobs, theirs.sequences[0].logprobs, atol=1e-5)
    base = vllm.sample(_request(AdapterRef(None, "tiny")))
    assert not np.allclose(base.sequences[0].logprobs, ours.sequences[0].logprobs, atol=1e-3)  # the adapter matters

    seeded = SamplingParams(max_tokens=6, temperature=1.0, top_k=20, top_p=0.9, seed=11, stop_at_eos=False)
    ours, theirs = both(n=3, params=seeded, prompt_logprobs=True, topk_prompt_logprobs=3, topk_sample_logprobs=2)
    assert [s.tokens for s in ours.sequences] == [s.tokens for s in theirs.sequences]  # sample i: seed + i
    assert len({tuple(s.tokens) for s in ours.sequences}) > 1
    np.testing.assert_allclose(ours.prompt_logprobs[1:], theirs.prompt_logprobs[1:], atol=1e-5)
    assert np.isnan(ours.prompt_logprobs[0])
    np.testing.assert_array_equal(ours.topk_prompt_logprobs[0][1:], theirs.topk_prompt_logprobs[0][1:])
    np.testing.assert_allclose(ours.topk_prompt_logprobs[1], theirs.topk_prompt_logprobs[1], atol=1e-5)
    for a, b in zip(ours.sequences, theirs.sequences):
        np.testing.assert_array_equal(a.topk_logprobs[0], b.topk_logprobs[0])
        np.testing.assert_allclose(a.topk_logprobs[1], b.topk_logprobs[1], atol=1e-5)

    name = f"run@{Path(published.uri).name}"
    body = fake.routes_called("/v1/completions")[-1]
    assert body["model"] == name and body["prompt"] == PROMPT and body["n"] == 1 and body["seed"] == 13
    assert body["top_k"] == 20 and body["logprobs"] == 2 and body["prompt_logprobs"] == 3
    assert fake.routes_called("/v1/load_lora_adapter") == [{"lora_name": name, "lora_path": published.uri}]


def test_stops_are_sent_as_vllm_stop_fields_and_a_stop_token_ends_the_sample(vllm, fake):
    base = AdapterRef(None, "tiny")
    free = vllm.sample(_request(base)).sequences[0]
    stop = free.tokens[2]
    params = SamplingParams(max_tokens=8, temperature=0.0, stop_tokens=(stop, 127))
    result = vllm.sample(_request(base, n=2, params=params))
    body = fake.routes_called("/v1/completions")[-1]
    assert body["n"] == 2 and "seed" not in body and body["model"] == "tiny-served"
    assert body["stop_token_ids"] == [stop, 127] and body["ignore_eos"] is False
    first = free.tokens.index(stop)
    for seq in result.sequences:
        assert seq.tokens == free.tokens[:first + 1] and seq.stop_reason == "stop"
        np.testing.assert_allclose(seq.logprobs, free.logprobs[:first + 1], atol=1e-6)
    strings = completion_bodies(_request(base, params=SamplingParams(stop_strings=("ab",), stop_at_eos=False)), "m")
    assert strings[0]["stop"] == ["ab"] and strings[0]["include_stop_str_in_output"] and strings[0]["ignore_eos"]


def test_a_new_version_retires_the_old_one_only_when_no_request_holds_it(trainer, vllm, fake, versions):
    v1 = trainer.snapshot_for_sampler("run")
    assert trainer.snapshot_for_sampler("run") == v1  # unchanged weights: no new version
    vllm.sample(_request(v1))
    n1 = f"run@{Path(v1.uri).name}"
    assert n1 in fake.loras

    held = versions.acquire(v1.uri)  # a request in flight on v1
    train_steps(trainer, "run", 1)
    v2 = trainer.snapshot_for_sampler("run")
    n2 = f"run@{Path(v2.uri).name}"
    assert Path(v2.uri).name == f"v2.{versions.generation}" and Path(v1.uri).is_dir()  # held: kept although newer exists
    vllm.sample(_request(v2))
    assert set(fake.loras) == {n1, n2}

    versions.release(held)
    assert not Path(v1.uri).exists()
    _wait_for(lambda: n1 not in fake.loras)
    assert fake.routes_called("/v1/unload_lora_adapter") == [{"lora_name": n1}]
    with pytest.raises(BadRequest, match="no longer kept"):
        vllm.sample(_request(v1))
    assert Path(v2.uri).is_dir() and n2 in fake.loras  # the newest version stays

    trainer.drop_adapter("run")  # the run is unloaded: its last version goes too
    assert not Path(v2.uri).exists()
    _wait_for(lambda: not fake.loras)


def test_evicted_adapter_404_is_reloaded_and_the_request_succeeds(trainer, vllm, fake):
    ref = trainer.snapshot_for_sampler("run")
    first = vllm.sample(_request(ref))
    name = f"run@{Path(ref.uri).name}"
    fake.forget(name)  # the replica lost it: completions answer 404
    again = vllm.sample(_request(ref))
    assert again.sequences[0].tokens == first.sequences[0].tokens
    assert [b["lora_name"] for b in fake.routes_called("/v1/load_lora_adapter")] == [name, name]
    statuses = [b["model"] for b in fake.routes_called("/v1/completions")]
    assert statuses == [name, name, name]  # first, the 404, the retry


def test_lru_eviction_in_the_server_is_survived(trainer, vllm, fake, tmp_path):
    # Three named checkpoint folders on a server that keeps two adapters: every request still works.
    refs = []
    for name in ("a", "b", "c"):
        train_steps(trainer, "run", 1)
        folder = tmp_path / "checkpoints" / name
        trainer.save_sampler_weights("run", folder)
        refs.append(AdapterRef(str(folder), "tiny"))
    outputs = [vllm.sample(_request(ref)).sequences[0].logprobs for ref in refs]
    assert len(fake.loras) == 2
    for ref, expected in zip(refs, outputs):
        np.testing.assert_allclose(vllm.sample(_request(ref)).sequences[0].logprobs, expected, atol=1e-6)
    assert len(fake.routes_called("/v1/load_lora_adapter")) > 3  # evicted ones were loaded again after a 404
    assert len({tuple(o) for o in outputs}) == 3  # three different adapters, each sampled as itself


def test_injected_500s_are_retried_and_persistent_ones_become_a_server_error(trainer, vllm, fake):
    ref = trainer.snapshot_for_sampler("run")
    fake.fail_next(500, times=1, route="/v1/load_lora_adapter")
    fake.fail_next(503, times=2)
    assert vllm.sample(_request(ref)).sequences[0].tokens
    fake.fail_next(500, times=FAST_RETRY.attempts)
    with pytest.raises(VllmUnavailable, match=r"failed /v1/completions 3 times: HTTP 500"):
        vllm.sample(_request(ref))


def test_unreachable_server_is_a_clear_server_error(versions):
    sampler = VllmSampler("http://127.0.0.1:9", {"tiny": "tiny-served"}, versions,
                          retry=RetryPolicy(attempts=2, backoff_seconds=0.01, timeout_seconds=2.0))
    try:
        with pytest.raises(VllmUnavailable, match=r"vLLM server at http://127.0.0.1:9 .*unreachable"):
            sampler.sample(_request(AdapterRef(None, "tiny")))
    finally:
        sampler.close()


def test_user_errors_name_the_field(trainer, vllm, fake, tmp_path):
    with pytest.raises(BadRequest, match="prompt_alt_tokens_k"):
        vllm.sample(_request(AdapterRef(None, "tiny"), prompt_alt_tokens_k=2))
    with pytest.raises(BadRequest, match="base_model 'other'"):
        vllm.sample(_request(AdapterRef(None, "other")))
    with pytest.raises(BadRequest, match="has no adapter_config.json"):
        vllm.sample(_request(AdapterRef(str(tmp_path / "missing"), "tiny")))
    with pytest.raises(BadRequest, match="vLLM rejected the sampling request"):  # the fake's own validation: 400
        vllm.sample(_request(AdapterRef(None, "tiny"), params=SamplingParams(max_tokens=200)))


def test_protocol_step_delivers_results_and_cancel_drops_them(trainer, vllm):
    ref = trainer.snapshot_for_sampler("run")
    keep, drop = _request(ref), _request(ref)
    vllm.submit(keep)
    vllm.submit(drop)
    vllm.cancel(drop.request_id)
    finished = {}
    deadline = time.time() + 10
    while vllm.has_work():
        assert time.time() < deadline
        finished.update(vllm.step())
    assert list(finished) == [keep.request_id] and finished[keep.request_id].sequences[0].tokens


def test_after_a_restart_names_are_new_and_an_old_folder_is_refused_not_resolved(trainer, vllm, fake, tmp_path):
    """A run resuming in a new process numbers its versions from 1 again: without the process's generation in
    the name, a client holding the old folder (and vLLM's registration of the old name) would get the new
    weights in place of the ones it saved."""
    from tinkerd.backends.versions import AdapterVersions, VersionedTrainer

    old = trainer.snapshot_for_sampler("run")
    before = vllm.sample(_request(old)).sequences[0].logprobs
    old_name = f"run@{Path(old.uri).name}"
    assert old_name in fake.loras
    vllm.close()
    versions = AdapterVersions(tmp_path / "adapters", keep=1)  # a new tinkerd process
    assert not Path(old.uri).exists()
    train_steps(trainer.trainer, "run", 2)
    new = VersionedTrainer(trainer.trainer, versions).snapshot_for_sampler("run")
    assert Path(new.uri).name.startswith("v1.") and new.uri != old.uri
    sampler = VllmSampler(fake.url, {"tiny": "tiny-served"}, versions, retry=FAST_RETRY)
    try:
        with pytest.raises(BadRequest, match="no longer kept"):
            sampler.sample(_request(old))
        after = sampler.sample(_request(new)).sequences[0].logprobs
    finally:
        sampler.close()
    assert not np.allclose(after, before, atol=1e-3)  # the new weights, under their own name
    assert [b["lora_name"] for b in fake.routes_called("/v1/load_lora_adapter")] == [old_name, f"run@{Path(new.uri).name}"]