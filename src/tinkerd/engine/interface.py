"""The seams between the front end and an engine: `Trainer`, `Sampler` and the values they trade.

Torch-free on purpose: the server imports this module, and a Ray or vLLM engine implements the
same protocols in another process. Ordering and futures are the front end's job; an engine runs
the operations it is handed, in the order it is handed them.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

import numpy as np

from tinkerd.protocol.types import (
    AdamParams,
    ForwardBackwardCall,
    ForwardBackwardResult,
    SampleResult,
    SamplingParams,
)


class RunLost(RuntimeError):
    """An engine lost what it held in memory for a training run (its worker died). The front end
    rebuilds the run from its restore point and request journal if it keeps one, else the request fails
    with a `server` error carrying this message."""

    def __init__(self, message: str, model_id: str | None = None) -> None:
        super().__init__(message)
        self.model_id = model_id


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter's shape. alpha is fixed at 32 like the hosted service; scale = alpha / rank."""

    rank: int = 32
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    alpha: float = 32.0


MEMORY = "mem://"  # AdapterRef.uri of an in-memory sampler snapshot: mem://<run>@<version>


@dataclass(frozen=True)
class AdapterRef:
    """Immutable handle to adapter weights a sampler can use.

    `uri` is `mem://<run>@<version>` for an in-memory sampler snapshot or a directory holding adapter
    files (a checkpoint, or a version folder written for an out-of-process sampler); None means the
    base model without adapter.
    """

    uri: str | None
    base_model: str

    @classmethod
    def in_memory(cls, key: str, base_model: str) -> "AdapterRef":
        return cls(uri=MEMORY + key, base_model=base_model)

    @property
    def memory_key(self) -> str | None:
        """`<run>@<version>` of an in-memory snapshot; None for a folder or the base model."""
        return memory_key(self.uri)


def memory_key(adapter_uri: str | None) -> str | None:
    """The key of an in-memory sampler snapshot's URI (`mem://<key>`); None for anything else."""
    return adapter_uri[len(MEMORY):] if adapter_uri and adapter_uri.startswith(MEMORY) else None


def version_folder(versions_root: Path, model_id: str, label: str) -> Path:
    """Where the version `label` of a run's adapter is written for an out-of-process sampler (vLLM)."""
    return Path(versions_root) / model_id / label


def version_run(adapter_uri: str | None, versions_root: Path) -> str | None:
    """The training run whose version folder (`version_folder`) a URI is; else None."""
    if not adapter_uri or memory_key(adapter_uri) is not None:
        return None
    folder = Path(adapter_uri)
    return folder.parent.name if folder.parent.parent == Path(versions_root) else None


def snapshot_run(adapter_uri: str | None, versions_root: Path | None = None) -> str | None:
    """The training run whose sampler snapshot a URI names: an in-memory one (`mem://<run>@<version>`) or,
    given where versions are written, a version folder; else None (base model, a checkpoint's folder)."""
    key = memory_key(adapter_uri)
    if key is not None:
        return key.rsplit("@", 1)[0]
    return version_run(adapter_uri, versions_root) if versions_root is not None else None


@dataclass(frozen=True)
class BaseModelInfo:
    name: str
    tokenizer_id: str
    arch: str
    max_context_length: int
    max_lora_rank: int
    vocab_size: int = 0  # 0: not known (the front end then checks tensor widths only in the engine)


class Trainer(Protocol):
    def base_models(self) -> list[BaseModelInfo]: ...

    def create_adapter(self, model_id: str, base_model: str, spec: AdapterSpec) -> None: ...

    def drop_adapter(self, model_id: str) -> None: ...

    def forward_backward(self, call: ForwardBackwardCall) -> ForwardBackwardResult: ...

    def forward_backward_many(self, calls: list[ForwardBackwardCall]) -> list[ForwardBackwardResult | Exception]:
        """Run requests of any tenants together; each gets its result or its own (user) error."""
        ...

    def optim_step(self, model_id: str, params: AdamParams) -> dict[str, float]: ...

    def snapshot_for_sampler(self, model_id: str) -> AdapterRef: ...

    def publish_inflight(self, model_id: str) -> AdapterRef:
        """Update the run's shared inflight sampler target to its current weights and name it. In-memory engines
        keep one target that decoding rows adopt at their next step; version-folder engines (vLLM, FSDP) write a
        new version, which requests started after the save use."""
        ...

    def save_sampler_weights(self, model_id: str, directory: Path) -> None: ...

    def save_state(self, model_id: str, directory: Path, with_gradients: bool = False) -> None: ...

    def load_state(self, model_id: str, base_model: str | None, directory: Path, with_optimizer: bool) -> AdapterSpec: ...


def forward_backward_one(trainer: Trainer, call: ForwardBackwardCall) -> ForwardBackwardResult:
    """`Trainer.forward_backward` by way of `forward_backward_many`: the result, or its error raised."""
    result = trainer.forward_backward_many([call])[0]
    if isinstance(result, Exception):
        raise result
    return result


@dataclass(frozen=True)
class SampleTask:
    request_id: str
    adapter: AdapterRef
    prompt: list[int]
    num_samples: int
    params: SamplingParams
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    prompt_logprobs_last_n: int | None = None  # score only the last n prompt tokens (prompt and top-k)
    target_prompt_logprobs: np.ndarray | None = None  # int64 (len(prompt) - 1, K): ids to score, -1 = none
    prompt_alt_tokens_k: int = 0  # draws per prompt position from the model's next-token distribution
    topk_sample_logprobs: int = 0  # top-k logprobs at every sampled position
    stream: bool = False  # report each new token (`StreamingSampler.take_progress`), not only the result

    @property
    def scores_prompt(self) -> bool:
        """Whether the prefill must keep every position's logits."""
        return (self.prompt_logprobs or self.topk_prompt_logprobs > 0 or self.target_prompt_logprobs is not None
                or self.prompt_alt_tokens_k > 0)


class Sampler(Protocol):
    """Continuous batching: requests are submitted from any thread and advance one token per `step`."""

    def submit(self, request: SampleTask) -> None: ...

    def cancel(self, request_id: str) -> None: ...

    def has_work(self) -> bool: ...

    def step(self) -> list[tuple[str, SampleResult | Exception]]:
        """Advance every active request by one token; return the requests that finished (or failed)."""
        ...


@dataclass(frozen=True)
class TokenProgress:
    """A token that row `sample` of a streaming request (`SampleTask.stream`) drew in the last `step`:
    its id, its logprob and, with `topk_sample_logprobs`, the top-k (ids, logprobs) at that position."""

    request_id: str
    sample: int
    token: int
    logprob: float
    topk: tuple[np.ndarray, np.ndarray] | None = None


@runtime_checkable
class StreamingSampler(Sampler, Protocol):
    """A sampler that can tell, after each `step`, which tokens its streaming requests drew.

    Optional: a sampler without it (Ray, vLLM) still answers streaming requests, all tokens at once in
    the result. The result stays the authority: its tokens start with the ones reported here."""

    def take_progress(self) -> list[TokenProgress]:
        """The tokens drawn since the last call (on the thread that calls `step`), oldest first."""
        ...


# Which ordered operation the trainer calls of the engine thread belong to.
_ordered: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar("tinkerd_ordered_op", default=None)


@contextlib.contextmanager
def ordered_op(model_id: str | None, seq_id: int | None) -> Iterator[None]:
    """Trainer calls made inside belong to operation `seq_id` of `model_id` (no-op without a seq_id).

    The scheduler sets it around each ordered job on the engine thread; a fenced backend reads it
    (`current_op`) to check that order, never to decide it."""
    token = _ordered.set((model_id, seq_id) if model_id and seq_id else None)
    try:
        yield
    finally:
        _ordered.reset(token)


def current_op() -> tuple[str, int] | None:
    return _ordered.get()
