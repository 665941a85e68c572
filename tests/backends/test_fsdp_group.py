"""FSDP2 trainer group on 2 CPU ranks (gloo), against the unsharded `LocalTrainer` on the same tiny model.

One group serves the module (starting 2 ranks costs seconds); every test uses fresh adapter ids, and
replays the same calls on an in-process reference trainer (fp32, one thread like each rank).
"""

from __future__ import annotations

import os
import signal
import uuid

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_runtime, tiny_runtimes
from tinkerd.engine.adapter_files import read_peft_adapter, read_training_extras
from tinkerd.backends.fsdp_group import FsdpTrainerGroup, GroupLost
from tinkerd.engine.interface import AdapterSpec
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.protocol.types import AdamParams, BadRequest, Datum, ForwardBackwardCall

BASE = "tiny"
SEED = 0
STEP = AdamParams(learning_rate=5e-2)


def _datum(tokens, weights=None) -> Datum:
    tokens = np.asarray(tokens, dtype=np.int64)
    weights = np.ones(len(tokens) - 1, dtype=np.float32) if weights is None else np.asarray(weights, np.float32)
    return Datum(tokens[:-1], {"target_tokens": tokens[1:], "weights": weights})


DATA = [_datum([3, 5, 7, 9, 11, 13]), _datum([4, 6, 8, 10], [1.0, 0.5, 2.0])]
OTHER = [_datum([20, 21, 22, 23, 24, 25, 26]), _datum([30, 2, 31])]


def _call(model_id, data=DATA, forward_only=False) -> ForwardBackwardCall:
    return ForwardBackwardCall(model_id, 0, "cross_entropy", {}, forward_only, data)


def _new_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def group():
    with FsdpTrainerGroup(2, tiny_runtimes, (BASE, SEED)) as built:
        yield built


@pytest.fixture
def reference(one_thread):
    return LocalTrainer(tiny_runtimes(BASE, SEED))


def _both(group, reference, method, *args):
    """The same call on the group and on the reference; both results."""
    return getattr(group, method)(*args), getattr(reference, method)(*args)


def _assert_results_equal(got, want):
    assert type(got) is type(want)
    if isinstance(want, Exception):
        assert str(got) == str(want)
        return
    assert got.metrics == pytest.approx(want.metrics, rel=1e-6, abs=1e-6)
    for g, w in zip(got.outputs, want.outputs, strict=True):
        np.testing.assert_allclose(g["logprobs"], w["logprobs"], rtol=1e-6, atol=1e-6)


def _sampler_weights(trainer, model_id, folder) -> dict[str, torch.Tensor]:
    trainer.save_sampler_weights(model_id, folder)
    return read_peft_adapter(folder)[1]


def _assert_tensors_equal(got: dict, want: dict, atol=1e-6):
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol, msg=name)


def test_each_rank_holds_half_the_decoder_weights_and_the_whole_tied_head(group):
    model = make_tiny_runtime(BASE, SEED).model
    whole = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()  # tied to the embeddings: replicated
    shards = group.base_shard_numel()
    assert [w for _, w in shards] == [whole, whole]
    assert all(local < whole for local, _ in shards)
    assert sum(local for local, _ in shards) == whole + head  # sharded weights once, the head on both ranks


def test_ranks_ignore_a_terminals_ctrl_c_so_the_server_can_still_use_them_while_it_shuts_down(group):
    for pid in group.pids:
        os.kill(pid, signal.SIGINT)
    model_id = _new_id("i")
    group.create_adapter(model_id, BASE, AdapterSpec(rank=2, seed=1))
    group.forward_backward(_call(model_id))
    assert len(set(group.replica_digests(model_id))) == 1


def test_a_sharded_step_equals_the_unsharded_step(group, reference, tmp_path):
    model_id = _new_id("a")
    _both(group, reference, "create_adapter", model_id, BASE, AdapterSpec(rank=4, seed=3))
    _assert_results_equal(*_both(group, reference, "forward_backward", _call(model_id)))
    got_step, want_step = _both(group, reference, "optim_step", model_id, STEP)
    assert got_step == pytest.approx(want_step, rel=1e-6)
    _assert_results_equal(*_both(group, reference, "forward_backward", _call(model_id, forward_only=True)))
    got = _sampler_weights(group, model_id, tmp_path / "group")
    want = _sampler_weights(reference, model_id, tmp_path / "reference")
    assert any(name.endswith("lora_B.weight") and w.abs().max() > 0 for name, w in want.items())  # it trained
    _assert_tensors_equal(got, want)
    digests = group.replica_digests(model_id)
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks hold the same updated replica


def test_state_saved_by_the_group_equals_the_unsharded_state_and_resumes_exactly(group, reference, tmp_path):
    model_id = _new_id("s")
    _both(group, reference, "create_adapter", model_id, BASE, AdapterSpec(rank=8, seed=5, train_unembed=False))
    for _ in range(2):
        _both(group, reference, "forward_backward", _call(model_id, OTHER))
        _both(group, reference, "optim_step", model_id, STEP)
    _both(group, reference, "forward_backward", _call(model_id))  # pending gradients, kept with the state
    group.save_state(model_id, tmp_path / "group", True)
    reference.save_state(model_id, tmp_path / "reference", True)
    _assert_tensors_equal(read_peft_adapter(tmp_path / "group")[1], read_peft_adapter(tmp_path / "reference")[1])
    got_extras, got_meta = read_training_extras(tmp_path / "group")
    want_extras, want_meta = read_training_extras(tmp_path / "reference")
    assert got_meta == want_meta
    _assert_tensors_equal(got_extras, want_extras, atol=1e-5)
    resumed = _new_id("r")
    group.load_state(resumed, BASE, tmp_path / "group", True)  # every rank reads the folder
    assert len(set(group.replica_digests(resumed))) == 1
    _both(group, reference, "optim_step", model_id, STEP)
    group.optim_step(resumed, STEP)
    assert group.replica_digests(resumed) == group.replica_digests(model_id)


def test_one_tenants_optim_step_leaves_the_other_slots_bit_identical(group, reference):
    a, b, idle = _new_id("a"), _new_id("b"), _new_id("idle")
    for model_id, seed in ((a, 1), (b, 2), (idle, 3)):
        _both(group, reference, "create_adapter", model_id, BASE, AdapterSpec(rank=4, seed=seed))
    _both(group, reference, "forward_backward", _call(idle))
    _both(group, reference, "optim_step", idle, STEP)  # a trained, non-zero slot
    _both(group, reference, "forward_backward_many", [_call(a), _call(b, OTHER)])  # both accumulate gradients
    before = {m: group.replica_digests(m) for m in (b, idle)}
    _both(group, reference, "optim_step", a, STEP)
    assert {m: group.replica_digests(m) for m in (b, idle)} == before
    assert group.replica_digests(a) != group.replica_digests(b)
    # b's pending gradient survived a's step: its own step still equals the reference's
    got_step, want_step = _both(group, reference, "optim_step", b, STEP)
    assert got_step == pytest.approx(want_step, rel=1e-6)
    _assert_results_equal(*_both(group, reference, "forward_backward", _call(b, OTHER, forward_only=True)))


def test_a_batch_across_two_adapters_matches_the_unsharded_batch_and_a_bad_request_fails_alone(group, reference,
                                                                                            tmp_path):
    a, b = _new_id("a"), _new_id("b")
    _both(group, reference, "create_adapter", a, BASE, AdapterSpec(rank=4, seed=7))
    _both(group, reference, "create_adapter", b, BASE, AdapterSpec(rank=16, seed=8, train_attn=False))
    bad = ForwardBackwardCall(b, 0, "cross_entropy", {}, False, [_datum([3, 500, 4])])  # token out of vocab
    calls = [_call(a), _call(b, OTHER), bad, _call(a, OTHER, forward_only=True)]
    got, want = _both(group, reference, "forward_backward_many", calls)
    assert isinstance(got[2], BadRequest) and "vocabulary" in str(got[2])
    for g, w in zip(got, want, strict=True):
        _assert_results_equal(g, w)
    for model_id in (a, b):
        _both(group, reference, "optim_step", model_id, STEP)
        _assert_tensors_equal(_sampler_weights(group, model_id, tmp_path / f"g-{model_id}"),
                              _sampler_weights(reference, model_id, tmp_path / f"r-{model_id}"))
    with pytest.raises(BadRequest, match="not loaded"):
        group.optim_step(_new_id("never-created"), STEP)  # a request error leaves the group serving
    with pytest.raises(BadRequest, match="not loaded"):  # written by rank 0 only, refused by every rank
        group.save_sampler_weights(_new_id("never-created"), tmp_path / "never")
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(OSError):  # rank 0 alone fails to write: an error for this call, the group serves on
        group.save_sampler_weights(b, tmp_path / "a-file")
    _both(group, reference, "drop_adapter", a)
    with pytest.raises(BadRequest, match="not loaded"):
        group.forward_backward(_call(a))
    assert len(set(group.replica_digests(b))) == 1


def bf16_runtimes(name: str, seed: int) -> dict:
    return {name: make_tiny_runtime(name, seed, dtype=torch.bfloat16)}


def test_a_sharded_bf16_model_trains_like_the_unsharded_one(one_thread, tmp_path):
    """bf16 is the served compute dtype: its all-gathers over gloo, and the same step as unsharded."""
    reference = LocalTrainer(bf16_runtimes(BASE, SEED))
    with FsdpTrainerGroup(2, bf16_runtimes, (BASE, SEED)) as group:
        _both(group, reference, "create_adapter", "m", BASE, AdapterSpec(rank=4, seed=3))
        _assert_results_equal(*_both(group, reference, "forward_backward", _call("m")))
        _both(group, reference, "optim_step", "m", STEP)
        _assert_results_equal(*_both(group, reference, "forward_backward", _call("m", forward_only=True)))
        _assert_tensors_equal(_sampler_weights(group, "m", tmp_path / "g"),
                              _sampler_weights(reference, "m", tmp_path / "r"))


def create_refusing_runtimes(name: str, seed: int) -> dict:
    """Fault injection: rank 1 of a group refuses to create adapters named `diverge-*`; rank 0 creates them."""
    import torch.distributed as dist

    from tinkerd.engine.trainer import LocalTrainer

    if dist.get_rank() == 1:
        create = LocalTrainer.create_adapter

        def refusing(self, model_id, base_model, spec):
            if model_id.startswith("diverge-"):
                raise BadRequest("injected refusal")
            return create(self, model_id, base_model, spec)

        LocalTrainer.create_adapter = refusing
    return tiny_runtimes(name, seed)


def test_ranks_that_end_a_call_differently_fail_the_group_instead_of_serving_diverged_replicas():
    with FsdpTrainerGroup(2, create_refusing_runtimes, (BASE, SEED)) as group:
        group.create_adapter("m", BASE, AdapterSpec(rank=4, seed=1))
        with pytest.raises(GroupLost, match="ranks ended create_adapter differently.*injected refusal"):
            group.create_adapter("diverge-1", BASE, AdapterSpec(rank=4, seed=1))
        with pytest.raises(GroupLost):
            group.forward_backward(_call("m"))


def test_a_dead_rank_fails_the_next_call_as_group_lost():
    with FsdpTrainerGroup(2, tiny_runtimes, (BASE, SEED)) as group:
        group.create_adapter("m", BASE, AdapterSpec(rank=4, seed=1))
        os.kill(group.pids[1], signal.SIGKILL)
        with pytest.raises(GroupLost, match="rank1 died"):
            group.forward_backward(_call("m"))
        with pytest.raises(GroupLost):
            group.optim_step("m", STEP)  # stays lost: the adapters are gone
