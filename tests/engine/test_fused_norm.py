"""Compiled RMSNorm layers: the same logits and LoRA gradients as Hugging Face's eager layers, for any
batch shape, and the same math in eager mode when the compiler fails."""

import logging

import torch

from tinkerd.engine.kernels import fused_norm
from tinkerd.engine.interface import AdapterSpec
from tests.conftest import make_tiny_runtime


def _logits_and_grads(rt, tokens, mask):
    b = [m.adapters["a"].B for m in rt.lora.modules.values()]
    for p in b:
        p.grad = None
    logits = rt.logits(tokens, mask, ["a"] * tokens.shape[0])
    (logits.float().square() * mask[..., None]).mean().backward()
    return logits.detach(), [p.grad.clone() for p in b]


def _runtimes(dtype, count):
    runtimes = [make_tiny_runtime(seed=3, dtype=dtype) for _ in range(count)]
    for rt in runtimes:
        rt.lora.add("a", AdapterSpec(rank=4, seed=1))
        for m in rt.lora.modules.values():
            w = m.adapters["a"]
            w.B.data.normal_(generator=torch.Generator().manual_seed(2))
            w.A.data, w.B.data = w.A.data.to(dtype), w.B.data.to(dtype)
    return runtimes


def _pair(dtype):
    runtimes = _runtimes(dtype, 2)
    assert fused_norm.install(runtimes[1].model) == 5  # 2 layers x 2 + the final norm
    return runtimes


def test_compiled_norms_are_as_accurate_as_eager_for_several_shapes(monkeypatch):
    """Against a float64 reference, the compiled layers' logits and LoRA gradients are no further off
    than eager fp32's (the kernels reduce in another order, so they are not bit-identical)."""
    monkeypatch.setattr(fused_norm, "MIN_COMPILED_ELEMENTS", 0)  # the tiny model's inputs are all small
    calls = []
    monkeypatch.setattr(fused_norm._Kernel, "__call__", lambda self, *a: calls.append(1) or self.compiled(*a))
    eager, compiled = _pair(torch.float32)
    (reference,) = _runtimes(torch.float64, 1)
    for batch, length in [(2, 7), (1, 5), (3, 1)]:
        tokens = torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(batch))
        mask = torch.ones_like(tokens)
        want, want_grads = _logits_and_grads(reference, tokens, mask)
        errors = {}
        for name, rt in (("eager", eager), ("compiled", compiled)):
            got, grads = _logits_and_grads(rt, tokens, mask)
            errors[name] = ((got.double() - want).abs().max().item(),
                            max((g.double() - w).abs().max().item() for g, w in zip(grads, want_grads)))
        scale = max(w.abs().max().item() for w in want_grads)
        assert errors["compiled"][0] <= 2 * errors["eager"][0] + 1e-6, (batch, length, errors)
        assert errors["compiled"][1] <= 2 * errors["eager"][1] + 1e-6 * scale, (batch, length, errors)
    assert len(calls) == 3 * 5  # every norm of every pass went through the compiled kernel


def test_a_failing_compiler_falls_back_to_the_same_math(monkeypatch, caplog):
    eager, compiled = _pair(torch.float32)
    kernel = fused_norm._kernel

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(kernel, "compiled", broken)
    monkeypatch.setattr(kernel, "failed", False)
    monkeypatch.setattr(fused_norm, "MIN_COMPILED_ELEMENTS", 0)
    tokens, mask = torch.tensor([[5, 9, 3, 7]]), torch.ones(1, 4, dtype=torch.long)
    with caplog.at_level(logging.WARNING, logger="tinkerd.engine.kernels.fused_norm"):
        got, _ = _logits_and_grads(compiled, tokens, mask)
    want, _ = _logits_and_grads(eager, tokens, mask)
    assert torch.equal(got, want) and kernel.failed
    assert "using eager RMSNorm" in caplog.text
