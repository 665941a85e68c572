import numpy as np
import pytest
import torch

from tinkerd.engine.interface import AdapterSpec
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.protocol.types import AdamParams, BadRequest, Datum, ForwardBackwardCall
from tests.conftest import make_tiny_runtime


def _datum(tokens, weights):
    tokens = np.asarray(tokens, dtype=np.int64)
    return Datum(tokens[:-1], {"target_tokens": tokens[1:], "weights": np.asarray(weights, dtype=np.float32)})


def _call(data, forward_only=False, loss_fn="cross_entropy"):
    return ForwardBackwardCall("m", 1, loss_fn, {}, forward_only, data)


@pytest.fixture
def trainer():
    rt = make_tiny_runtime()
    t = LocalTrainer({"tiny": rt})
    t.create_adapter("m", "tiny", AdapterSpec(rank=4, seed=0))
    return t


def test_cross_entropy_loss_sum_equals_direct_formula(trainer):
    data = [_datum([3, 5, 7, 9, 11], [1.0, 0.5, -2.0, 0.0]), _datum([4, 6, 8], [2.0, 1.0])]
    result = trainer.forward_backward(_call(data, forward_only=True))
    model = trainer.runtimes["tiny"].model
    expected = 0.0
    for i, d in enumerate(data):
        with torch.no_grad():
            logp = model(torch.from_numpy(d.tokens)[None]).logits[0].float().log_softmax(-1)
        lp = logp.gather(-1, torch.from_numpy(d.loss_inputs["target_tokens"])[:, None])[:, 0].numpy()
        np.testing.assert_allclose(result.outputs[i]["logprobs"], lp, atol=1e-5)
        expected += -(d.loss_inputs["weights"] * lp).sum()
    assert result.metrics["loss:sum"] == pytest.approx(expected, abs=1e-4)


def test_soft_targets_shape_n_by_k(trainer):
    tokens = np.array([3, 5, 7], dtype=np.int64)
    targets = np.array([[5, 6], [7, 8], [9, 10]], dtype=np.int64)
    weights = np.array([[0.7, 0.3], [1.0, 0.0], [0.5, 0.5]], dtype=np.float32)
    out = trainer.forward_backward(_call([Datum(tokens, {"target_tokens": targets, "weights": weights})], True))
    lp = out.outputs[0]["logprobs"]
    assert lp.shape == (3, 2)
    assert out.metrics["loss:sum"] == pytest.approx(float(-(weights * lp).sum()), abs=1e-4)


def test_sft_steps_lower_the_loss(trainer):
    data = [_datum([3, 5, 7, 9, 11, 13, 15], [1.0] * 6)]
    losses = []
    for _ in range(8):
        losses.append(trainer.forward_backward(_call(data)).metrics["loss:sum"])
        metrics = trainer.optim_step("m", AdamParams(learning_rate=1e-2))
        assert metrics["grad_norm:mean"] > 0
    assert losses[-1] < 0.5 * losses[0]


def test_a_forward_pass_after_an_optimizer_step_sees_the_new_weights(trainer):
    """Passes without autograd reuse the adapter's compute-dtype copies until its weights change; the fused AdamW
    step writes them in place, so each forward-only pass must equal the next forward_backward's logprobs (which
    computes from the fp32 masters)."""
    data = [_datum([3, 5, 7, 9, 11, 13, 15], [1.0] * 6)]
    before = trainer.forward_backward(_call(data, forward_only=True)).outputs[0]["logprobs"]
    for _ in range(3):
        with_grad = trainer.forward_backward(_call(data)).outputs[0]["logprobs"]
        np.testing.assert_allclose(trainer.forward_backward(_call(data, forward_only=True)).outputs[0]["logprobs"],
                                   with_grad, atol=1e-5)
        trainer.optim_step("m", AdamParams(learning_rate=5e-2))
    after = trainer.forward_backward(_call(data, forward_only=True)).outputs[0]["logprobs"]
    assert np.abs(after - before).max() > 1e-2  # the steps moved the weights


def test_forward_only_leaves_no_gradient(trainer):
    trainer.forward_backward(_call([_datum([3, 5, 7], [1.0, 1.0])], forward_only=True))
    assert all(p.grad is None for p in trainer.runtimes["tiny"].lora.parameters("m"))


def test_errors_name_the_field(trainer):
    with pytest.raises(BadRequest, match=r"data\[0\]\.loss_fn_inputs\.weights"):
        trainer.forward_backward(_call([_datum([3, 5, 7], [1.0])]))
    with pytest.raises(BadRequest, match=r"data\[0\]\.model_input: token id 500"):
        trainer.forward_backward(_call([_datum([3, 500, 7], [1.0, 1.0])]))
    with pytest.raises(BadRequest, match="known losses: cross_entropy"):
        trainer.forward_backward(_call([_datum([3, 5, 7], [1.0, 1.0])], loss_fn="nope"))
    with pytest.raises(BadRequest, match="lora_config.rank"):
        trainer.create_adapter("x", "tiny", AdapterSpec(rank=0))
