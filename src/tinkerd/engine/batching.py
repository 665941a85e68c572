"""Turning datums from one or many requests into padded micro-batches that fit in memory.

`validate_datums` checks one request against the model before anything runs (errors name the
field). `plan_micro_batches` packs rows so that rows x longest row stays under a token budget
derived from free memory, so nobody sets batch knobs and a big request is split rather than
killed. `collate` pads one micro-batch. Knows nothing about adapters' weights or optimizers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tinkerd.engine.kernels.memory import available_memory_bytes
from tinkerd.protocol.types import BadRequest, Datum

TOKEN_BUDGET_CAP = 16384
TOKEN_BUDGET_FLOOR = 512


@dataclass
class Row:
    """One datum on its way into a batch, with the adapter and request it belongs to."""

    call: int
    index: int
    adapter: str
    datum: Datum

    @property
    def length(self) -> int:
        return len(self.datum.tokens)


@dataclass
class Batch:
    rows: list[Row]
    tokens: torch.Tensor  # (B, T) int64, right-padded
    mask: torch.Tensor  # (B, T) 1 = real token
    targets: torch.Tensor  # (B, T, K) int64
    inputs: dict[str, torch.Tensor]  # each (B, T, K) float32, zero in padding; "mask" marks real cells


def check_token_range(tokens: np.ndarray, vocab: int, field: str) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
        raise BadRequest(f"{field}: token id {bad} is outside the vocabulary [0, {vocab})")


def validate_datums(data: list[Datum], required: tuple[str, ...], optional: tuple[str, ...], vocab: int,
                    max_len: int) -> None:
    if not data:
        raise BadRequest("data: at least one datum is required")
    first_optional = sorted(n for n in optional if n in data[0].loss_inputs)
    for i, datum in enumerate(data):
        T = len(datum.tokens)
        if T == 0:
            raise BadRequest(f"data[{i}].model_input is empty")
        if T > max_len:
            raise BadRequest(f"data[{i}].model_input has {T} tokens; the model's context is {max_len}")
        check_token_range(datum.tokens, vocab, f"data[{i}].model_input")
        for name in required:
            if name not in datum.loss_inputs:
                raise BadRequest(f"data[{i}].loss_fn_inputs.{name} is required by this loss")
        if sorted(n for n in optional if n in datum.loss_inputs) != first_optional:
            raise BadRequest(f"data[{i}].loss_fn_inputs: every datum must carry the same optional inputs as data[0]")
        target = datum.loss_inputs["target_tokens"]
        if target.ndim not in (1, 2) or target.shape[0] != T:
            raise BadRequest(
                f"data[{i}].loss_fn_inputs.target_tokens has shape {tuple(target.shape)}; expected ({T},) "
                f"or ({T}, K) to match model_input"
            )
        check_token_range(target, vocab, f"data[{i}].loss_fn_inputs.target_tokens")
        for name in (*required, *optional):
            value = datum.loss_inputs.get(name)
            if name == "target_tokens" or value is None:
                continue
            if value.shape != target.shape:
                raise BadRequest(
                    f"data[{i}].loss_fn_inputs.{name} has shape {tuple(value.shape)}; "
                    f"expected {tuple(target.shape)} like target_tokens"
                )
            if not np.isfinite(value).all():
                raise BadRequest(f"data[{i}].loss_fn_inputs.{name} contains NaN or infinite values")


def token_budget(config, device: torch.device, dtype_bytes: int) -> int:
    """Tokens per micro-batch: a quarter of free memory over a per-token estimate of what training keeps,
    rounded down to a power of two.

    Per token: saved activations (~34 values of width `hidden` per layer, in the compute dtype)
    plus fp32 logits, their log-softmax pieces and gradient (~3 x vocab x 4 bytes).
    """
    layers = int(getattr(config, "num_hidden_layers", 12))
    hidden = int(getattr(config, "hidden_size", 1024))
    inter = int(getattr(config, "intermediate_size", 4 * hidden))
    per_token = layers * (24 * hidden + 4 * inter) * dtype_bytes + 3 * int(config.vocab_size) * 4
    budget = available_memory_bytes(device) // 4 // max(per_token, 1)
    # A power of two: the same split (and so bitwise the same sums) while free memory moves within a factor
    # of 2, e.g. when a crashed run's requests are replayed on a machine that is busier than before.
    budget = 1 << (int(budget).bit_length() - 1) if budget > 0 else 0
    return int(min(TOKEN_BUDGET_CAP, max(TOKEN_BUDGET_FLOOR, budget)))


def plan_micro_batches(rows: list[Row], budget: int) -> list[list[Row]]:
    """Greedy packing, longest rows first, keeping len(chunk) * longest <= budget (a lone row always fits).
    Within a chunk, rows of one adapter are contiguous, so each adapter's LoRA runs on a slice."""
    chunks: list[list[Row]] = []
    for row in sorted(rows, key=lambda r: r.length, reverse=True):
        if chunks and (len(chunks[-1]) + 1) * chunks[-1][0].length <= budget:
            chunks[-1].append(row)
        else:
            chunks.append([row])
    first_seen = {}
    for row in rows:
        first_seen.setdefault(row.adapter, len(first_seen))
    return [sorted(chunk, key=lambda r: first_seen[r.adapter]) for chunk in chunks]


def collate(rows: list[Row], input_names: set[str], device: torch.device) -> Batch:
    """Pad rows into (B, T) tokens and (B, T, K) targets and inputs; K is the widest target in the batch."""
    B = len(rows)
    T = max(r.length for r in rows)
    ks = [1 if r.datum.loss_inputs["target_tokens"].ndim == 1 else r.datum.loss_inputs["target_tokens"].shape[1]
          for r in rows]
    K = max(ks)
    tokens = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    targets = torch.zeros(B, T, K, dtype=torch.long)
    inputs = {n: torch.zeros(B, T, K, dtype=torch.float32) for n in (*sorted(input_names), "mask")}
    for i, (row, k) in enumerate(zip(rows, ks)):
        t = row.length
        tokens[i, :t] = torch.from_numpy(np.asarray(row.datum.tokens, dtype=np.int64))
        mask[i, :t] = 1
        targets[i, :t, :k] = torch.from_numpy(row.datum.loss_inputs["target_tokens"].astype(np.int64).reshape(t, k))
        inputs["mask"][i, :t, :k] = 1.0
        for name in input_names:
            value = row.datum.loss_inputs.get(name)
            if value is not None:
                inputs[name][i, :t, :k] = torch.from_numpy(value.astype(np.float32).reshape(t, k))
    return Batch(rows, tokens.to(device), mask.to(device), targets.to(device),
                 {n: v.to(device) for n, v in inputs.items()})


def merge_metrics(parts: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """Combine per-micro-batch metrics by their reduction suffix (`mean` weighted by real tokens)."""
    merged: dict[str, float] = {}
    weights: dict[str, float] = {}
    for metrics, weight in parts:
        for key, value in metrics.items():
            reduction = key.rsplit(":", 1)[-1]
            if key not in merged:
                merged[key], weights[key] = (value * weight if reduction == "mean" else value), weight
            elif reduction == "sum":
                merged[key] += value
            elif reduction == "mean":
                merged[key] += value * weight
                weights[key] += weight
            elif reduction == "min":
                merged[key] = min(merged[key], value)
            elif reduction == "max":
                merged[key] = max(merged[key], value)
            else:
                merged[key] = value
    for key in merged:
        if key.endswith(":mean"):
            merged[key] /= max(weights[key], 1e-12)
    return merged
