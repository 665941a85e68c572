"""save_state / load_state round-trip bit-exactly: same logprobs, same next optimizer step."""

import numpy as np
import pytest

from tinkerd.engine.interface import AdapterSpec
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.protocol.types import AdamParams, BadRequest, Datum, ForwardBackwardCall
from tests.conftest import make_tiny_runtime

DATUM = Datum(np.array([3, 5, 7, 9, 11], dtype=np.int64),
              {"target_tokens": np.array([5, 7, 9, 11, 13], dtype=np.int64), "weights": np.ones(5, dtype=np.float32)})
ADAM = AdamParams(learning_rate=1e-2, weight_decay=0.01, grad_clip_norm=1.0)


def _step(trainer, model_id):
    trainer.forward_backward(ForwardBackwardCall(model_id, 1, "cross_entropy", {}, False, [DATUM]))
    trainer.optim_step(model_id, ADAM)


def _logprobs(trainer, model_id):
    return trainer.forward_backward(ForwardBackwardCall(model_id, 1, "cross_entropy", {}, True, [DATUM])).outputs[0]["logprobs"]


def test_state_round_trip_is_bit_exact(tmp_path):
    original = LocalTrainer({"tiny": make_tiny_runtime()})
    original.create_adapter("m", "tiny", AdapterSpec(rank=4, seed=3))
    for _ in range(3):
        _step(original, "m")
    original.save_state("m", tmp_path / "ckpt")
    saved_lp = _logprobs(original, "m")
    _step(original, "m")
    next_lp = _logprobs(original, "m")

    restored = LocalTrainer({"tiny": make_tiny_runtime()})
    restored.load_state("r", "tiny", tmp_path / "ckpt", with_optimizer=True)
    np.testing.assert_array_equal(_logprobs(restored, "r"), saved_lp)
    _step(restored, "r")
    np.testing.assert_array_equal(_logprobs(restored, "r"), next_lp)

    fresh_optimizer = LocalTrainer({"tiny": make_tiny_runtime()})
    fresh_optimizer.load_state("w", "tiny", tmp_path / "ckpt", with_optimizer=False)
    np.testing.assert_array_equal(_logprobs(fresh_optimizer, "w"), saved_lp)
    _step(fresh_optimizer, "w")
    assert not np.array_equal(_logprobs(fresh_optimizer, "w"), next_lp)  # Adam moments matter


def test_sampler_weights_cannot_restore_an_optimizer(tmp_path):
    trainer = LocalTrainer({"tiny": make_tiny_runtime()})
    trainer.create_adapter("m", "tiny", AdapterSpec(rank=2, seed=0))
    trainer.save_sampler_weights("m", tmp_path / "sampler")
    with pytest.raises(BadRequest, match="no optimizer state"):
        trainer.load_state("x", "tiny", tmp_path / "sampler", with_optimizer=True)
    trainer.load_state("x", "tiny", tmp_path / "sampler", with_optimizer=False)


def test_same_seed_gives_identical_initial_adapter_across_processes_state():
    a = LocalTrainer({"tiny": make_tiny_runtime()})
    b = LocalTrainer({"tiny": make_tiny_runtime()})
    a.create_adapter("m", "tiny", AdapterSpec(rank=4, seed=11))
    b.create_adapter("n", "tiny", AdapterSpec(rank=4, seed=11))
    for (_, pa), (_, pb) in zip(a.runtimes["tiny"].lora.named_parameters("m"), b.runtimes["tiny"].lora.named_parameters("n")):
        assert np.array_equal(pa.detach().numpy(), pb.detach().numpy())
