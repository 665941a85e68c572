"""Plain, torch-free values that cross from the wire into the engine and back.

Arrays are numpy; the engine turns them into tensors. Validation that needs no model (shapes,
dtypes, ranges) happens here, and errors name the offending field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


class BadRequest(ValueError):
    """A client mistake; the message names the field. Reported as a 4xx or a `user` error."""


@dataclass
class Datum:
    """One training example: input tokens and per-position loss inputs (position i predicts target i)."""

    tokens: np.ndarray  # (T,) int64
    loss_inputs: dict[str, np.ndarray]  # e.g. target_tokens (T,) or (T, K); weights same shape
    target_spans: list["ProvenanceSpan"] | None = None  # provenance of target positions, tiling them in order


@dataclass(frozen=True)
class ProvenanceSpan:
    """`length` target positions that are tokens [offset, offset + length) of a sampled sequence
    (`sampled`) or of the prompt of the request that produced it (`prompt`)."""

    kind: str
    sequence_id: str
    offset: int
    length: int


@dataclass
class ForwardBackwardCall:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_config: dict[str, float | str]
    forward_only: bool
    data: list[Datum]
    custom_loss: Any = None  # loss_fn "custom": the session's `protocol.custom_loss.CustomLoss` named by loss_id


@dataclass
class ForwardBackwardResult:
    outputs: list[dict[str, np.ndarray]]  # one dict per datum, always with "logprobs"
    metrics: dict[str, float]  # keys are "name:reduction"


MAX_LEARNING_RATE = 10.0  # Adam moves each weight by ~lr per step: beyond this nothing trains, it only overflows
MAX_WEIGHT_DECAY = 10.0  # decoupled: each step scales weights by (1 - lr * weight_decay)


@dataclass(frozen=True)
class AdamParams:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def __post_init__(self) -> None:
        """Ranges beyond which no run trains sensibly; non-finite values are refused (a step with them would
        leave every weight NaN). `MAX_LEARNING_RATE`, `MAX_WEIGHT_DECAY`: docs/operations.md."""
        for name in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise BadRequest(f"adam_params.{name} must be a finite number, got {value!r}")
        if not 0 <= self.learning_rate <= MAX_LEARNING_RATE:
            raise BadRequest(f"adam_params.learning_rate must be in [0, {MAX_LEARNING_RATE}], got {self.learning_rate}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise BadRequest(f"adam_params.{name} must be in [0, 1), got {value}")
        if not 0 < self.eps <= 1:
            raise BadRequest(f"adam_params.eps must be in (0, 1], got {self.eps}")
        if not 0 <= self.weight_decay <= MAX_WEIGHT_DECAY:
            raise BadRequest(f"adam_params.weight_decay must be in [0, {MAX_WEIGHT_DECAY}], got {self.weight_decay}")
        if not self.grad_clip_norm >= 0:
            raise BadRequest(f"adam_params.grad_clip_norm must be >= 0 (0 = off), got {self.grad_clip_norm}")


SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1  # int64: sample i draws from seed + i (< 2^64, torch's range)


@dataclass(frozen=True)
class SamplingParams:
    """How to continue a prompt. Sampling stops at any stop string or stop token, and at the model's
    end-of-sequence tokens unless `stop_at_eos` is False (the wire's `stop: []`)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_tokens: tuple[int, ...] = ()
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise BadRequest(f"sampling_params.max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature < math.inf:
            raise BadRequest(f"sampling_params.temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k == 0 or self.top_k < -1:
            raise BadRequest(f"sampling_params.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise BadRequest(f"sampling_params.top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise BadRequest(f"sampling_params.seed must be in [{SEED_MIN}, {SEED_MAX}] (int64), got {self.seed}")


TOPK_SENTINEL_LOGPROB = -99999.0  # top-k prompt rows with no score (position 0, or before prompt_logprobs_last_n)


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "stop" or "length"
    topk_logprobs: tuple[np.ndarray, np.ndarray] | None = None  # ids int32 (T, K), logprobs float32 (T, K)


@dataclass
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float] | None = None  # NaN at position 0
    topk_prompt_logprobs: tuple[np.ndarray, np.ndarray] | None = None  # ids int32 (N, K), logprobs float32 (N, K)
    target_prompt_logprobs: np.ndarray | None = None  # float32 (N - 1, K), 0.0 where nothing was asked
    prompt_alt_tokens: tuple[np.ndarray, np.ndarray] | None = None  # ids int64 (N - 1, k), logprobs float32 (N - 1, k)
