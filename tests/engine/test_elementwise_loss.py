"""`elementwise_loss` in forward / forward_backward outputs: every built-in loss, per datum, per token.

Checks, through the `LocalTrainer`, that each datum's `elementwise_loss` has the shape of its
`target_tokens`, sums to that datum's share of `loss:sum` (the loss:sum of a request holding that datum
alone), that the shares add up to the batch's `loss:sum`, and that each token's value is the loss
written out by hand for the simplest cases (cross_entropy with (T,) and (T, K) targets).
"""

from __future__ import annotations

import numpy as np
import pytest

from tinkerd.engine.interface import AdapterSpec
from tinkerd.engine.losses import LOSSES
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.protocol.types import Datum, ForwardBackwardCall
from tests.conftest import make_tiny_runtime

CONFIGS = {"dro": {"beta": 0.3}, "stable_reinforce": {"kl_coeff": 0.2, "clip_high": 1.5}}


@pytest.fixture(scope="module")
def trainer():
    t = LocalTrainer({"tiny": make_tiny_runtime()})
    t.create_adapter("m", "tiny", AdapterSpec(rank=4, seed=0))
    return t


def datums(name: str) -> list[Datum]:
    """Three datums of different lengths (so the batch pads), with every input any loss reads."""
    rng = np.random.default_rng(3)
    out = []
    for n in (9, 4, 6):
        tokens = rng.integers(2, 120, n)
        extra = {"weights": rng.uniform(-0.5, 1.5, n - 1), "logprobs": rng.uniform(-6.0, -3.5, n - 1),
                 "advantages": rng.normal(0, 1, n - 1), "sequence_ratio_mask": np.r_[0.0, np.ones(n - 2)],
                 "sampler_logprobs": rng.uniform(-6.0, -3.5, n - 1)}
        loss = LOSSES[name]
        keep = {k: np.asarray(v, np.float32) for k, v in extra.items() if k in (*loss.required_inputs,
                                                                               *loss.optional_inputs)}
        out.append(Datum(tokens[:-1].astype(np.int64), {"target_tokens": tokens[1:].astype(np.int64), **keep}))
    return out


def run(trainer, name, data, forward_only=True):
    return trainer.forward_backward(ForwardBackwardCall("m", 1, name, dict(CONFIGS.get(name, {})), forward_only, data))


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("forward_only", [True, False])
def test_elementwise_loss_sums_to_each_datums_share_of_loss_sum(trainer, name, forward_only):
    data = datums(name)
    result = run(trainer, name, data, forward_only)
    shares = []
    for i, (datum, output) in enumerate(zip(data, result.outputs)):
        elementwise = output["elementwise_loss"]
        assert elementwise.dtype == np.float32
        assert elementwise.shape == datum.loss_inputs["target_tokens"].shape
        alone = run(trainer, name, [datum]).metrics["loss:sum"]
        assert float(elementwise.sum()) == pytest.approx(alone, rel=1e-5, abs=1e-5), f"datum {i}"
        shares.append(float(elementwise.sum()))
    assert sum(shares) == pytest.approx(result.metrics["loss:sum"], rel=1e-5, abs=1e-5)
    for param in trainer.runtimes["tiny"].lora.parameters("m"):
        param.grad = None


def test_cross_entropy_elementwise_is_minus_weight_times_logprob_for_1d_and_2d_targets(trainer):
    rng = np.random.default_rng(5)
    tokens = rng.integers(2, 120, 7).astype(np.int64)
    weights = rng.uniform(-1, 2, 6).astype(np.float32)
    soft_targets = rng.integers(2, 120, (6, 3)).astype(np.int64)
    soft_weights = rng.dirichlet(np.ones(3), 6).astype(np.float32)
    data = [Datum(tokens[:-1], {"target_tokens": tokens[1:], "weights": weights}),
            Datum(tokens[:-1], {"target_tokens": soft_targets, "weights": soft_weights})]
    result = run(trainer, "cross_entropy", data)
    for datum, output in zip(data, result.outputs):
        assert output["elementwise_loss"].shape == datum.loss_inputs["target_tokens"].shape
        np.testing.assert_allclose(output["elementwise_loss"], -datum.loss_inputs["weights"] * output["logprobs"],
                                   rtol=1e-6, atol=1e-7)
