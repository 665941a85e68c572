"""Giving memory back: the LRU cache of read-only adapters (respecting pins), dropping a trained
adapter with its optimizer and snapshots, and the exact save/restore used to unload a lapsed run."""

import numpy as np
import torch

from tinkerd.engine import lora as lora_module
from tinkerd.engine.adapter_files import write_peft_adapter
from tinkerd.engine.interface import AdapterRef, AdapterSpec, SampleTask
from tinkerd.engine.sampler import LocalSampler
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.protocol.types import AdamParams, Datum, ForwardBackwardCall, SamplingParams
from tests.conftest import make_tiny_runtime

SPEC = AdapterSpec(rank=4, seed=0)
DATUM = Datum(np.array([3, 5, 7, 9], dtype=np.int64),
              {"target_tokens": np.array([5, 7, 9, 11], dtype=np.int64), "weights": np.ones(4, dtype=np.float32)})
ADAM = AdamParams(learning_rate=1e-2)


def _adapter_dirs(tmp_path, runtime, n):
    """n checkpoint folders with different random adapters (as the sampler reads them)."""
    dirs = []
    for i in range(n):
        runtime.lora.add("src", AdapterSpec(rank=4, seed=i))
        for name, p in runtime.lora.named_parameters("src"):
            if name.endswith("lora_B"):
                p.data.normal_(std=0.3, generator=torch.Generator().manual_seed(i))
        folder = tmp_path / f"ckpt{i}"
        write_peft_adapter(folder, runtime.lora.export("src"), SPEC, "tiny", runtime.lora.target_names(SPEC))
        runtime.lora.remove("src")
        dirs.append(str(folder))
    return dirs


def _dir_keys(runtime):
    return [k for k in runtime.lora.specs if k.startswith("dir:")]


def test_sampler_adapters_from_folders_are_evicted_lru_but_never_while_pinned(tmp_path):
    rt = make_tiny_runtime()
    rt.lora.cache_max_adapters = 2
    dirs = _adapter_dirs(tmp_path, rt, 5)
    sampler = LocalSampler({"tiny": rt})
    params = SamplingParams(max_tokens=4, seed=1, stop_at_eos=False)
    # A long sample on dirs[0] is in flight (admitted, pinned) while the others come and go.
    sampler.submit(SampleTask("long", AdapterRef(dirs[0], "tiny"), [3, 4], 1,
                                 SamplingParams(max_tokens=40, seed=1, stop_at_eos=False)))
    sampler.step()
    assert rt.lora.pins == {f"dir:{dirs[0]}": 1}
    for d in dirs[1:]:
        sampler.sample(AdapterRef(d, "tiny"), [3, 4], 1, params)
    # dirs[0] is the least recently used but pinned: it stays; the cache holds it plus the newest one.
    assert _dir_keys(rt) == [f"dir:{dirs[0]}", f"dir:{dirs[4]}"]
    assert rt.lora.cached_keys() == [f"dir:{dirs[0]}", f"dir:{dirs[4]}"]
    while sampler.has_work():
        sampler.step()
    assert not rt.lora.pins
    # Finishing its sample made dirs[0] the most recently used: a new one evicts dirs[4].
    assert rt.lora.cached_keys() == [f"dir:{dirs[4]}", f"dir:{dirs[0]}"]
    sampler.sample(AdapterRef(dirs[1], "tiny"), [3, 4], 1, params)
    assert rt.lora.cached_keys() == [f"dir:{dirs[0]}", f"dir:{dirs[1]}"]
    sampler.sample(AdapterRef(dirs[0], "tiny"), [3, 4], 1, params)  # used again: to the back of the line
    sampler.sample(AdapterRef(dirs[2], "tiny"), [3, 4], 1, params)
    assert rt.lora.cached_keys() == [f"dir:{dirs[0]}", f"dir:{dirs[2]}"]
    assert sorted(_dir_keys(rt)) == sorted(rt.lora.cached_keys())
    # An evicted adapter is read again from its folder, with the same result.
    first = sampler.sample(AdapterRef(dirs[3], "tiny"), [3, 4], 1, params)
    sampler.sample(AdapterRef(dirs[1], "tiny"), [3, 4], 1, params)
    sampler.sample(AdapterRef(dirs[2], "tiny"), [3, 4], 1, params)
    assert f"dir:{dirs[3]}" not in rt.lora.specs
    again = sampler.sample(AdapterRef(dirs[3], "tiny"), [3, 4], 1, params)
    assert again.sequences[0].tokens == first.sequences[0].tokens
    assert again.sequences[0].logprobs == first.sequences[0].logprobs


def test_cache_limits_by_bytes_and_spares_fresh_unpinned_loads(tmp_path):
    rt = make_tiny_runtime()
    dirs = _adapter_dirs(tmp_path, rt, 3)
    from tinkerd.engine.adapter_files import read_peft_adapter

    lora = rt.lora
    for d in dirs:
        spec, state = read_peft_adapter(d)
        lora.load(f"dir:{d}", spec, state)
    one = lora.nbytes(f"dir:{dirs[0]}")
    assert one > 0 and lora.nbytes() == 3 * one
    lora.cache_max_bytes = 2 * one
    # Just loaded and never pinned: a request is about to use them, so nothing goes yet.
    assert lora.evict_cached() == [] and len(_dir_keys(rt)) == 3
    later = lora_module.time.monotonic() + lora_module.CACHE_GRACE_SECONDS + 1
    assert lora.evict_cached(now=later) == [f"dir:{dirs[0]}"]
    assert lora.nbytes() == 2 * one
    # A pinned adapter is skipped; the next least recently used one goes instead.
    lora.pin(f"dir:{dirs[1]}")
    lora.unpin(f"dir:{dirs[1]}")  # now the most recently used
    lora.cache_max_bytes = one
    assert lora.evict_cached(now=later) == [f"dir:{dirs[2]}"]
    lora.pin(f"dir:{dirs[1]}")
    lora.cache_max_bytes = 0
    assert lora.evict_cached(now=later) == []
    lora.unpin(f"dir:{dirs[1]}")  # the last pin released: evicted at once
    assert _dir_keys(rt) == [] and lora.nbytes() == 0


def test_trained_adapters_are_not_cached_and_drop_frees_everything():
    rt = make_tiny_runtime()
    trainer = LocalTrainer({"tiny": rt})
    trainer.create_adapter("m", "tiny", SPEC)
    trainer.create_adapter("other", "tiny", SPEC)
    other_bytes = rt.lora.nbytes("other")
    for _ in range(3):
        trainer.forward_backward(ForwardBackwardCall("m", 1, "cross_entropy", {}, False, [DATUM]))
        trainer.optim_step("m", ADAM)
        trainer.snapshot_for_sampler("m")
    trainer.forward_backward(ForwardBackwardCall("m", 1, "cross_entropy", {}, False, [DATUM]))  # pending gradients
    assert rt.lora.cached_keys() == []
    assert sorted(k for k in rt.lora.specs if k.startswith("m")) == ["m", "m@1", "m@2", "m@3"]
    rt.lora.pin("m@3")  # a sample is running on the newest snapshot
    trainer.drop_adapter("m")
    assert "m" not in trainer.adapters
    assert sorted(rt.lora.specs) == ["m@3", "other"]
    rt.lora.unpin("m@3")
    assert sorted(rt.lora.specs) == ["other"]
    assert rt.lora.nbytes() == other_bytes
    # the other tenant still trains
    before = trainer.forward_backward(ForwardBackwardCall("other", 1, "cross_entropy", {}, False, [DATUM]))
    trainer.optim_step("other", ADAM)
    after = trainer.forward_backward(ForwardBackwardCall("other", 1, "cross_entropy", {}, True, [DATUM]))
    assert after.metrics["loss:sum"] < before.metrics["loss:sum"]


def test_state_with_gradients_resumes_mid_accumulation_exactly(tmp_path):
    def run(unload_between):
        trainer = LocalTrainer({"tiny": make_tiny_runtime()})
        trainer.create_adapter("m", "tiny", AdapterSpec(rank=4, seed=5))
        trainer.forward_backward(ForwardBackwardCall("m", 1, "cross_entropy", {}, False, [DATUM]))
        trainer.optim_step("m", ADAM)
        trainer.forward_backward(ForwardBackwardCall("m", 1, "cross_entropy", {}, False, [DATUM]))
        if unload_between:
            trainer.save_state("m", tmp_path / "parked", with_gradients=True)
            trainer.drop_adapter("m")
            assert trainer.runtimes["tiny"].lora.nbytes() == 0
            trainer.load_state("m", None, tmp_path / "parked", with_optimizer=True)
        trainer.optim_step("m", ADAM)
        out = trainer.forward_backward(ForwardBackwardCall("m", 1, "cross_entropy", {}, True, [DATUM]))
        return out.outputs[0]["logprobs"], trainer.adapters["m"].version

    (reference, v1), (resumed, v2) = run(False), run(True)
    assert v1 == v2 == 2
    np.testing.assert_array_equal(resumed, reference)
