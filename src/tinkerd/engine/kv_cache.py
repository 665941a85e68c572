"""Preallocated key/value storage for decoding: one (rows, kv_heads, columns, head_dim) pair per layer.

Row r holds `lengths[r]` cached tokens in columns [0, lengths[r]); the rows in use are packed at
the front (rows [0, rows)), so a decode step reads one slab and writes one column per row in
place. Capacity grows by doubling; nothing is copied per token (Hugging Face's `DynamicCache`
concatenates the whole cache every step). Knows nothing about models or sampling.
"""

from __future__ import annotations

import torch


def _at_least(current: int, needed: int, floor: int) -> int:
    size = max(current, floor)
    while size < needed:
        size *= 2
    return size


class SlotKVCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = (layers, kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)
        self.rows = 0

    @property
    def capacity(self) -> tuple[int, int]:
        return (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)

    def max_length(self) -> int:
        return int(self.lengths[: self.rows].max()) if self.rows else 0

    def reserve(self, rows: int, columns: int) -> None:
        """Make room for `rows` rows of `columns` tokens, keeping what is cached."""
        have_rows, have_cols = self.capacity
        new_rows, new_cols = _at_least(have_rows, rows, 4), _at_least(have_cols, columns, 64)
        if (new_rows, new_cols) == (have_rows, have_cols):
            return
        layers, kv_heads, head_dim = self.shape
        used = self.max_length()
        for store in (self.keys, self.values):
            old = list(store)
            store.clear()
            for layer in range(layers):
                fresh = torch.zeros(new_rows, kv_heads, new_cols, head_dim, dtype=self.dtype, device=self.device)
                if old:
                    fresh[: self.rows, :, :used] = old[layer][: self.rows, :, :used]
                store.append(fresh)
        lengths = torch.zeros(new_rows, dtype=torch.long, device=self.device)
        lengths[: self.rows] = self.lengths[: self.rows]
        self.lengths = lengths

    def add_rows(self, count: int, columns: int) -> slice:
        """Claim `count` empty rows after the rows in use; returns their slice."""
        self.reserve(self.rows + count, columns)
        added = slice(self.rows, self.rows + count)
        self.lengths[added] = 0
        self.rows += count
        return added

    def write_prefix(self, layer: int, rows: slice, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write (N, kv_heads, T, head_dim) into columns [0, T) of `rows`."""
        width = keys.shape[2]
        self.keys[layer][rows, :, :width] = keys
        self.values[layer][rows, :, :width] = values

    def write_next(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write one token per row in use, (rows, kv_heads, 1, head_dim), at column `lengths[row]`."""
        index = torch.arange(self.rows, device=self.device)
        columns = self.lengths[: self.rows]
        self.keys[layer][index, :, columns] = keys[:, :, 0]
        self.values[layer][index, :, columns] = values[:, :, 0]

    def view(self, layer: int, rows: slice, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][rows, :, :columns], self.values[layer][rows, :, :columns]

    def repeat_rows(self, source: slice, repeats: list[int]) -> slice:
        """Replace the rows of `source` by each row repeated `repeats[i]` times (in order); returns their slice."""
        assert source.stop == self.rows, "only the newest rows can be repeated"
        index = torch.repeat_interleave(torch.arange(source.start, source.stop, device=self.device),
                                        torch.tensor(repeats, device=self.device))
        total = int(index.numel())
        self.reserve(source.start + total, self.capacity[1])
        used = int(self.lengths[source].max())
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[source.start: source.start + total, :, :used] = tensor[index, :, :used]
        self.lengths[source.start: source.start + total] = self.lengths[index].clone()
        self.rows = source.start + total
        return slice(source.start, self.rows)

    def keep(self, survivors: list[int]) -> list[int]:
        """Drop every row in use not in `survivors` (ascending), moving tail rows into the holes.

        Returns the new order: new row j holds what old row `order[j]` held.
        """
        count = len(survivors)
        movers = [r for r in survivors if r >= count]  # survivors past the new end move into the holes
        holes = sorted(set(range(count)) - {r for r in survivors if r < count})
        order = list(range(count))
        if movers:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            used = self.max_length()
            for store in (self.keys, self.values):
                for tensor in store:
                    tensor[dst, :, :used] = tensor[src, :, :used]
            self.lengths[dst] = self.lengths[src]
            for hole, mover in zip(holes, movers):
                order[hole] = mover
        self.rows = count
        return order
