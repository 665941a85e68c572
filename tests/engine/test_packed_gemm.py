"""Prepacked oneDNN GEMMs for frozen base linears: the same logprobs and LoRA gradients as plain torch."""

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import make_tiny_runtime
from tinkerd.engine.kernels import packed_gemm
from tinkerd.engine.interface import AdapterSpec
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.protocol.types import AdamParams, Datum, ForwardBackwardCall

TOKENS = np.array([3, 17, 5, 99, 42, 8, 64, 21, 7, 11, 2, 90], dtype=np.int64)
DATUM = Datum(TOKENS[:-1], {"target_tokens": TOKENS[1:], "weights": np.ones(len(TOKENS) - 1, dtype=np.float32)})


def _trained(packed: bool):
    runtime = make_tiny_runtime()
    assert packed_gemm.install(runtime.model, "on" if packed else "off") == (7 * 2 + 1 if packed else 0)
    trainer = LocalTrainer({"tiny": runtime})
    trainer.create_adapter("m", "tiny", AdapterSpec(rank=4, seed=0))  # LoRA everywhere, the unembedding too
    for _ in range(2):  # B starts at zero: train it so gradients flow through every path
        trainer.forward_backward(ForwardBackwardCall("m", 1, "cross_entropy", {}, False, [DATUM]))
        trainer.optim_step("m", AdamParams(learning_rate=0.05))
    out = trainer.forward_backward(ForwardBackwardCall("m", 1, "cross_entropy", {}, False, [DATUM]))
    grads = [p.grad.clone() for p in trainer.adapters["m"].optimizer.param_groups[0]["params"]]
    return runtime, out.outputs[0]["logprobs"], grads


def test_packed_linears_give_the_same_logprobs_and_lora_gradients():
    runtime, logprobs, grads = _trained(packed=True)
    assert not packed_gemm.frozen_linears(runtime.model)  # every base linear (and the tied head) was packed
    _, reference_logprobs, reference_grads = _trained(packed=False)
    np.testing.assert_allclose(np.asarray(logprobs), np.asarray(reference_logprobs), rtol=1e-5, atol=1e-5)
    assert len(grads) == len(reference_grads) and any(g.abs().sum() > 0 for g in grads)
    for ours, reference in zip(grads, reference_grads):  # fp32, another summation order (through 2 Adam steps)
        assert (ours - reference).norm() <= 1e-4 * reference.norm() + 1e-7


def test_the_input_gradient_is_x_w_and_trainable_linears_stay_plain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    model[0].requires_grad_(False)
    assert packed_gemm.install(model, "on") == 1 and type(model[1]) is nn.Linear  # trainable: untouched
    x = torch.randn(3, 5, 8, requires_grad=True)
    y = model[0](x)
    torch.testing.assert_close(y, x @ model[0].weight.T + model[0].bias)
    (grad,) = torch.autograd.grad((y * y).sum(), x)
    torch.testing.assert_close(grad, (2 * y) @ model[0].weight)


def test_auto_packs_fp32_on_cpu_only_when_it_fits():
    gib = 1 << 30
    assert packed_gemm.should_pack("auto", torch.float32, "cpu", gib, 24 * gib)
    assert not packed_gemm.should_pack("auto", torch.float32, "cpu", 7 * gib, 24 * gib)  # over a quarter of the RAM
    assert not packed_gemm.should_pack("auto", torch.bfloat16, "cpu", gib, 24 * gib)
    assert not packed_gemm.should_pack("auto", torch.float32, "cuda", gib, 24 * gib)
    assert packed_gemm.should_pack("on", torch.bfloat16, "cpu", 7 * gib, 24 * gib)
    with pytest.raises(ValueError, match="packed_gemms"):
        packed_gemm.should_pack("fast", torch.float32, "cpu", gib, 24 * gib)
