"""Frozen linear layers' forward as prepacked oneDNN GEMMs on CPU.

torch multiplies fp32 on CPU with MKL, which on the AMD EPYC (AVX2) development machine ran well
below oneDNN once the weight is reordered into oneDNN's blocked layout, most of all for the few
rows of a decode step (one core, 16 x 576 @ 576 x 1536: 565 us vs 409 us; 512 rows: 15.4 ms vs
12.0 ms; SmolLM2's 49k-row unembedding at 16 rows: 47.7 ms vs 25.8 ms). A base model's linears
never change, so `install` reorders each weight once and the forward multiplies with that copy;
the input gradient of the backward pass stays a plain matmul (packing W^T too, for 2048-row
training steps, measured no faster and doubled the memory). The copy costs the linear weights'
memory once more (0.5 GB for SmolLM2 in fp32), so `auto` packs only fp32 on CPU, and only while
the copies take at most a quarter of the machine's memory.

Knows nothing of LoRA (the adapters' rank-r GEMMs stay plain torch) or of particular models.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
MAX_MEMORY_SHARE = 0.25  # `auto`: the packed copies may take at most this share of physical memory


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


class _PackedLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W prepacked; the gradient reaches x only (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "PackedLinear") -> torch.Tensor:
        ctx.layer = layer
        return packed_linear(x, layer.packed_weight, layer.bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.weight, None


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose frozen weight also lives prepacked (`install` turns linears into these)."""

    packed_weight: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _PackedLinearFunction.apply(x, self)
        return packed_linear(x, self.packed_weight, self.bias)


def frozen_linears(model: nn.Module) -> list[nn.Linear]:
    """Plain `nn.Linear` layers whose weight takes no gradient."""
    return [m for m in model.modules() if type(m) is nn.Linear and not m.weight.requires_grad]


def should_pack(mode: str, dtype: torch.dtype, device: torch.device | str, extra_bytes: int,
                memory_bytes: int) -> bool:
    """`on`/`off` as said; `auto`: fp32 on CPU whose packed copies fit in MAX_MEMORY_SHARE of the memory."""
    if mode not in MODES:
        raise ValueError(f"packed_gemms must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    return (torch.device(device).type == "cpu" and dtype == torch.float32
            and torch.backends.mkldnn.is_available() and extra_bytes <= MAX_MEMORY_SHARE * memory_bytes)


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def install(model: nn.Module, mode: str = "auto") -> int:
    """Prepack the model's frozen linears when `should_pack` says so; returns how many were packed."""
    layers = frozen_linears(model)
    if not layers:
        return 0
    weight = layers[0].weight
    extra = sum(layer.weight.numel() * layer.weight.element_size() for layer in layers)
    if not should_pack(mode, weight.dtype, weight.device, extra, physical_memory_bytes()):
        return 0
    with torch.no_grad():
        for layer in layers:
            layer.packed_weight = pack_weight(layer.weight)
            layer.__class__ = PackedLinear
    log.info("prepacked %d frozen linear layers for oneDNN (%.0f MB)", len(layers), extra / 2**20)
    return len(layers)
