"""The in-process `Trainer`: LoRA forward/backward with the built-in losses, and AdamW steps.

Gradients accumulate in each adapter's fp32 master weights across `forward_backward` calls until
`optim_step` consumes them. Requests are validated before anything is mutated, so a bad request
fails alone and leaves the adapter as it was. Runs whatever it is handed, in that order: per-model
`seq_id` ordering is the front end's job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinkerd.engine.adapter_files import write_peft_adapter
from tinkerd.engine.interface import AdapterRef, AdapterSpec, BaseModelInfo
from tinkerd.engine.losses import get_loss
from tinkerd.engine.runtime import ModelRuntime
from tinkerd.protocol.types import AdamParams, BadRequest, Datum, ForwardBackwardCall, ForwardBackwardResult

log = logging.getLogger(__name__)

MAX_LORA_RANK = 128
SNAPSHOTS_KEPT_PER_MODEL = 8


@dataclass
class TrainedAdapter:
    runtime: ModelRuntime
    spec: AdapterSpec
    optimizer: torch.optim.AdamW
    snapshots: list[str]
    version: int = 0


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T) int64, right-padded
    mask: torch.Tensor  # (B, T) 1 = real token
    targets: torch.Tensor  # (B, T, K) int64
    inputs: dict[str, torch.Tensor]  # each (B, T, K) float32, zero in padding
    target_shapes: list[tuple[int, ...]]  # each datum's original target shape


class LocalTrainer:
    def __init__(self, runtimes: dict[str, ModelRuntime]) -> None:
        self.runtimes = runtimes
        self.adapters: dict[str, TrainedAdapter] = {}

    def base_models(self) -> list[BaseModelInfo]:
        return [
            BaseModelInfo(name, rt.tokenizer_id, rt.config.model_type, rt.max_context, MAX_LORA_RANK)
            for name, rt in self.runtimes.items()
        ]

    def create_adapter(self, model_id: str, base_model: str, spec: AdapterSpec) -> None:
        runtime = self.runtimes.get(base_model)
        if runtime is None:
            raise BadRequest(f"base_model {base_model!r} is not served here; served: {sorted(self.runtimes)}")
        if not 1 <= spec.rank <= MAX_LORA_RANK:
            raise BadRequest(f"lora_config.rank must be in [1, {MAX_LORA_RANK}], got {spec.rank}")
        if not (spec.train_attn or spec.train_mlp or spec.train_unembed):
            raise BadRequest("lora_config: at least one of train_attn, train_mlp, train_unembed must be true")
        if model_id in self.adapters:
            return  # idempotent
        params = runtime.lora.add(model_id, spec, trainable=True)
        optimizer = torch.optim.AdamW(params, lr=0.0, foreach=True)
        self.adapters[model_id] = TrainedAdapter(runtime, spec, optimizer, [])

    def drop_adapter(self, model_id: str) -> None:
        adapter = self.adapters.pop(model_id, None)
        if adapter is not None:
            for key in [model_id, *adapter.snapshots]:
                adapter.runtime.lora.remove(key)

    def _adapter(self, model_id: str) -> TrainedAdapter:
        adapter = self.adapters.get(model_id)
        if adapter is None:
            raise BadRequest(f"model_id {model_id!r} is not loaded in this engine")
        return adapter

    def forward_backward(self, call: ForwardBackwardCall) -> ForwardBackwardResult:
        adapter = self._adapter(call.model_id)
        loss = get_loss(call.loss_fn)
        if not call.data:
            raise BadRequest("data: at least one datum is required")
        config = loss.resolve_config(call.loss_fn, call.loss_config)
        batch = collate(call.data, loss.required_inputs, loss.optional_inputs, adapter.runtime)
        runtime = adapter.runtime
        with torch.set_grad_enabled(not call.forward_only):
            logits = runtime.logits(batch.tokens, batch.mask, [call.model_id] * len(call.data))  # (B, T, V)
            lp = logits.gather(-1, batch.targets) - logits.logsumexp(-1, keepdim=True)  # (B, T, K)
            del logits
            loss_value, metrics = loss.fn(lp, batch.inputs, config)
            if not call.forward_only:
                loss_value.backward()
        lp_np = lp.detach().numpy()
        outputs = []
        for i, shape in enumerate(batch.target_shapes):
            T, K = shape[0], shape[1] if len(shape) == 2 else 1
            outputs.append({"logprobs": lp_np[i, :T, :K].reshape(shape).astype(np.float32)})
        return ForwardBackwardResult(outputs, {"loss:sum": float(loss_value.detach()), **metrics})

    def optim_step(self, model_id: str, params: AdamParams) -> dict[str, float]:
        adapter = self._adapter(model_id)
        weights = adapter.runtime.lora.parameters(model_id)
        max_norm = params.grad_clip_norm if params.grad_clip_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(weights, max_norm)
        for group in adapter.optimizer.param_groups:
            group.update(lr=params.learning_rate, betas=(params.beta1, params.beta2), eps=params.eps,
                         weight_decay=params.weight_decay)
        adapter.optimizer.step()
        adapter.optimizer.zero_grad(set_to_none=True)
        adapter.version += 1
        return {"grad_norm:mean": float(grad_norm), "learning_rate:mean": params.learning_rate}

    def snapshot_for_sampler(self, model_id: str) -> AdapterRef:
        """Freeze the adapter as it is now, in memory, for sampling (no file, no base-model reload)."""
        adapter = self._adapter(model_id)
        key = f"{model_id}@{adapter.version}"
        if key not in adapter.snapshots:
            adapter.runtime.lora.clone(model_id, key)
            adapter.snapshots.append(key)
        while len(adapter.snapshots) > SNAPSHOTS_KEPT_PER_MODEL:
            adapter.runtime.lora.remove(adapter.snapshots.pop(0))
        return AdapterRef(uri=f"mem://{key}", base_model=adapter.runtime.name)

    def save_sampler_weights(self, model_id: str, directory: Path) -> None:
        adapter = self._adapter(model_id)
        lora = adapter.runtime.lora
        write_peft_adapter(directory, lora.export(model_id), adapter.spec, adapter.runtime.name,
                           lora.target_names(adapter.spec))


def collate(data: list[Datum], required: tuple[str, ...], optional: tuple[str, ...], runtime: ModelRuntime) -> Batch:
    """Validate the datums against the model and pad them into one batch (errors name the field)."""
    vocab, max_len = runtime.vocab_size, runtime.max_context
    lengths, ks = [], []
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
        lengths.append(T)
        ks.append(1 if target.ndim == 1 else target.shape[1])
    B, T, K = len(data), max(lengths), max(ks)
    tokens = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    targets = torch.zeros(B, T, K, dtype=torch.long)
    float_names = [n for n in (*required, *optional) if n != "target_tokens" and n in data[0].loss_inputs]
    for i, datum in enumerate(data):
        if sorted(n for n in optional if n in datum.loss_inputs) != sorted(n for n in optional if n in float_names):
            raise BadRequest(f"data[{i}].loss_fn_inputs: every datum must carry the same optional inputs as data[0]")
    inputs = {n: torch.zeros(B, T, K, dtype=torch.float32) for n in (*float_names, "mask")}
    for i, datum in enumerate(data):
        t, k = lengths[i], ks[i]
        tokens[i, :t] = torch.from_numpy(np.asarray(datum.tokens, dtype=np.int64))
        mask[i, :t] = 1
        inputs["mask"][i, :t, :k] = 1.0
        targets[i, :t, :k] = torch.from_numpy(datum.loss_inputs["target_tokens"].astype(np.int64).reshape(t, k))
        for n in float_names:
            inputs[n][i, :t, :k] = torch.from_numpy(datum.loss_inputs[n].astype(np.float32).reshape(t, k))
    return Batch(tokens.to(runtime.device), mask.to(runtime.device), targets.to(runtime.device),
                 {n: v.to(runtime.device) for n, v in inputs.items()},
                 [tuple(d.loss_inputs["target_tokens"].shape) for d in data])


def check_token_range(tokens: np.ndarray, vocab: int, field: str) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
        raise BadRequest(f"{field}: token id {bad} is outside the vocabulary [0, {vocab})")
