"""Prefill and decode passes of a Llama-family model over a `SlotKVCache`, for the sampler.

Calls the model's own modules (embeddings, norms, the LoRA-wrapped projections, MLPs, rotary
tables), so adapters route per row exactly as in training, but owns the attention and the
cache: prompts are prefilled right-padded into fresh rows, and each decode step writes one
column per row in place and attends over the used columns with a length mask (grouped-query
attention without repeating keys). Knows nothing about sampling rules or requests.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from tinkerd.engine.kv_cache import SlotKVCache
from tinkerd.engine.runtime import ModelRuntime

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Decoder:
    def __init__(self, runtime: ModelRuntime) -> None:
        model_type = getattr(runtime.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise NotImplementedError(
                f"sampling {runtime.name!r}: model_type {model_type!r} has no decoder here "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        self.runtime = runtime
        self.stack = runtime.backbone
        attention = self.stack.layers[0].self_attn
        self.head_dim = attention.head_dim
        self.heads = runtime.config.num_attention_heads
        self.kv_heads = runtime.config.num_key_value_heads
        self.scaling = attention.scaling

    def new_cache(self) -> SlotKVCache:
        return SlotKVCache(len(self.stack.layers), self.kv_heads, self.head_dim, self.runtime.dtype, self.runtime.device)

    def prefill(self, cache: SlotKVCache, prompts: list[list[int]], adapters: list[str | None],
                all_positions: bool = False) -> tuple[torch.Tensor, slice]:
        """Cache the prompts in new rows; fp32 logits of each prompt's last position (N, V), or every
        position (N, T, V) with `all_positions`, and the rows' slice."""
        width = max(len(p) for p in prompts)
        device = self.runtime.device
        tokens = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            tokens[i, : len(prompt)] = torch.tensor(prompt)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        rows = cache.add_rows(len(prompts), width)
        positions = torch.arange(width, device=device).expand(len(prompts), width)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        mask = causal[None] & (positions < lengths[:, None])[:, None, :]  # (N, T, T): key j <= query i, j real
        hidden = self._layers(tokens.to(device), positions, rows, cache, mask[:, None], adapters, width)
        cache.lengths[rows] = lengths
        if not all_positions:
            hidden = hidden[torch.arange(len(prompts), device=device), lengths - 1]
        with self.runtime.lora.router.route(adapters):
            return self.runtime.head(hidden).float(), rows

    def decode(self, cache: SlotKVCache, tokens: torch.Tensor, adapters: list[str | None]) -> torch.Tensor:
        """Feed one token per row in use (N,), at each row's next position; fp32 logits (N, V)."""
        rows = slice(0, cache.rows)
        positions = cache.lengths[rows].clone()
        width = int(positions.max()) + 1
        cache.reserve(cache.rows, width)
        mask = torch.arange(width, device=positions.device)[None, :] <= positions[:, None]  # (N, L)
        hidden = self._layers(tokens[:, None], positions[:, None], rows, cache, mask[:, None, None], adapters, width,
                              decoding=True)
        cache.lengths[rows] += 1
        with self.runtime.lora.router.route(adapters):
            return self.runtime.head(hidden[:, -1]).float()

    def _layers(self, tokens_N_T, positions_N_T, rows: slice, cache: SlotKVCache, mask, adapters, columns: int,
                decoding: bool = False) -> torch.Tensor:
        n, t = tokens_N_T.shape
        stack = self.stack
        with self.runtime.lora.router.route(adapters):
            hidden = stack.embed_tokens(tokens_N_T)
            cos, sin = stack.rotary_emb(hidden, positions_N_T)
            cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
            for index, layer in enumerate(stack.layers):
                attention = layer.self_attn
                x = layer.input_layernorm(hidden)
                q = attention.q_proj(x).view(n, t, self.heads, self.head_dim)
                k = attention.k_proj(x).view(n, t, self.kv_heads, self.head_dim)
                v = attention.v_proj(x).view(n, t, self.kv_heads, self.head_dim).transpose(1, 2)
                if hasattr(attention, "q_norm"):  # Qwen3 normalises each head before rotary
                    q, k = attention.q_norm(q), attention.k_norm(k)
                q = _rotate(q.transpose(1, 2), cos, sin)
                k = _rotate(k.transpose(1, 2), cos, sin)
                if decoding:
                    cache.write_next(index, k, v)
                else:
                    cache.write_prefix(index, rows, k, v)
                keys, values = cache.view(index, rows, columns)
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling,
                                                     enable_gqa=self.kv_heads != self.heads)
                hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(n, t, self.heads * self.head_dim))
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            return stack.norm(hidden)
