"""Chunked target logprobs: the same values and gradients whether chunks are kept or recomputed."""

import pytest
import torch

from tinkerd.engine import runtime as runtime_module
from tests.conftest import make_tiny_runtime


@pytest.mark.parametrize("keep_bytes", [0, 1 << 30])  # 0: every chunk is recomputed in the backward
def test_target_logprobs_match_full_log_softmax_values_and_grads(monkeypatch, keep_bytes):
    monkeypatch.setattr(runtime_module, "LOGPROB_CHUNK", {torch.float32: 5})  # several chunks, a ragged last one
    monkeypatch.setattr(runtime_module, "KEEP_LOGSOFTMAX_BYTES", keep_bytes)
    rt = make_tiny_runtime()
    head = rt.head.weight
    head.requires_grad_(True)  # a stand-in for trained parameters: the gradient must flow through the chunks
    tokens = torch.randint(0, rt.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, rt.vocab_size, (2, 7, 2), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    weights = torch.randn(2, 7, 2, generator=torch.Generator().manual_seed(2))

    ours = rt.target_logprobs(tokens, mask, [None, None], targets)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), head)
    reference = rt.logits(tokens, mask, [None, None]).log_softmax(-1).gather(-1, targets)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), head)

    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_ours, grad_reference, atol=1e-5, rtol=1e-4)


def test_chunks_cover_every_row_once_and_never_hold_exactly_32():
    for total in range(1, 300):
        bounds = runtime_module.chunk_bounds(total, 64)
        assert [i for start, end in bounds for i in range(start, end)] == list(range(total))
        assert all(end - start != 32 for start, end in bounds)
