"""The slot KV cache: growth keeps what is cached, repeats and compaction move whole rows."""

import torch

from tinkerd.engine.kv_cache import SlotKVCache


def _cache_with_rows(lengths):
    cache = SlotKVCache(layers=2, kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))
    rows = cache.add_rows(len(lengths), max(lengths))
    for layer in range(2):
        # Row i, column c holds (layer, i, c) so every move is visible.
        keys = torch.tensor([[[[layer, i + c / 100]] * 1 for c in range(max(lengths))] for i in range(len(lengths))])
        keys = keys.reshape(len(lengths), max(lengths), 1, 2).transpose(1, 2)
        cache.write_prefix(layer, rows, keys, -keys)
    cache.lengths[rows] = torch.tensor(lengths)
    return cache


def _row(cache, layer, row):
    length = int(cache.lengths[row])
    return cache.keys[layer][row, 0, :length, 1].tolist(), cache.values[layer][row, 0, :length, 1].tolist()


def test_growth_keeps_rows_and_columns():
    cache = _cache_with_rows([3, 5])
    before = [_row(cache, layer, r) for layer in range(2) for r in range(2)]
    cache.reserve(rows=40, columns=300)
    assert cache.capacity[0] >= 40 and cache.capacity[1] >= 300
    assert [_row(cache, layer, r) for layer in range(2) for r in range(2)] == before


def test_repeat_rows_then_keep_compacts_and_reports_the_order():
    cache = _cache_with_rows([2, 4])
    rows = cache.repeat_rows(slice(0, 2), [3, 1])
    assert (rows.start, rows.stop, cache.rows) == (0, 4, 4)
    assert [int(x) for x in cache.lengths[:4]] == [2, 2, 2, 4]
    original = {r: _row(cache, 1, r) for r in range(4)}
    order = cache.keep([1, 3])  # row 3 (the length-4 one) moves into the hole at 0
    assert cache.rows == 2 and sorted(order) == [1, 3]
    for new, old in enumerate(order):
        assert _row(cache, 1, new) == original[old]


def test_write_next_appends_at_each_rows_length():
    cache = _cache_with_rows([1, 3])
    step = torch.tensor([[[[9.0, 9.0]]], [[[8.0, 8.0]]]])  # (rows, heads, 1, dim)
    cache.write_next(0, step, step)
    assert cache.keys[0][0, 0, 1].tolist() == [9.0, 9.0]  # row 0 had 1 token: column 1
    assert cache.keys[0][1, 0, 3].tolist() == [8.0, 8.0]  # row 1 had 3 tokens: column 3
