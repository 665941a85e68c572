"""Batch surgery on Hugging Face `DynamicCache`s for continuous batching.

Rows of a decode batch are left-padded to a common cache length (an attention mask hides the
padding): a new request's cache is padded and concatenated in, finished rows are selected out,
and leading columns that no remaining row uses are trimmed. Only full-attention layers (keys and
values of shape (B, H, L, D)) are supported; knows nothing about sampling.
"""

from __future__ import annotations

import torch


def _layers(cache):
    return cache.layers


def cache_length(cache) -> int:
    layer = _layers(cache)[0]
    return 0 if layer.keys is None else layer.keys.shape[-2]


def left_pad(cache, columns: int) -> None:
    if columns <= 0:
        return
    for layer in _layers(cache):
        B, H, _, D = layer.keys.shape
        pad = layer.keys.new_zeros(B, H, columns, D)
        layer.keys = torch.cat([pad, layer.keys], dim=-2)
        layer.values = torch.cat([pad.clone(), layer.values], dim=-2)


def append_rows(cache, other) -> None:
    """Concatenate `other`'s rows after `cache`'s (both already padded to the same length)."""
    for layer, extra in zip(_layers(cache), _layers(other)):
        layer.keys = torch.cat([layer.keys, extra.keys], dim=0)
        layer.values = torch.cat([layer.values, extra.values], dim=0)


def select_rows(cache, rows: torch.Tensor) -> None:
    for layer in _layers(cache):
        layer.keys = layer.keys.index_select(0, rows)
        layer.values = layer.values.index_select(0, rows)


def trim_left(cache, columns: int) -> None:
    if columns <= 0:
        return
    for layer in _layers(cache):
        layer.keys = layer.keys[:, :, columns:].contiguous()
        layer.values = layer.values[:, :, columns:].contiguous()


def repeat_rows(cache, times: int) -> None:
    for layer in _layers(cache):
        layer.keys = layer.keys.repeat_interleave(times, dim=0)
        layer.values = layer.values.repeat_interleave(times, dim=0)
