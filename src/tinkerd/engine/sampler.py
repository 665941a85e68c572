"""The in-process `Sampler`: prefill the prompt once, share its KV cache across samples, decode.

Sample i of a request draws from its own generator seeded with `seed + i`, so a request is
reproducible whatever else runs, and `num_samples > 1` gives different samples. Returned
logprobs are the model's own (temperature 1, before top-k/top-p), the same quantity the trainer's
`forward` reports for those tokens. Returned tokens include the stop token or stop string.
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path

import torch

from tinkerd.engine.adapter_files import read_peft_adapter
from tinkerd.engine.interface import AdapterRef
from tinkerd.engine.runtime import ModelRuntime
from tinkerd.engine.batching import check_token_range
from tinkerd.protocol.types import BadRequest, SampledSequence, SampleResult, SamplingParams

import numpy as np


class LocalSampler:
    def __init__(self, runtimes: dict[str, ModelRuntime]) -> None:
        self.runtimes = runtimes

    def _runtime(self, base_model: str) -> ModelRuntime:
        runtime = self.runtimes.get(base_model)
        if runtime is None:
            raise BadRequest(f"base_model {base_model!r} is not served here; served: {sorted(self.runtimes)}")
        return runtime

    def _adapter_key(self, runtime: ModelRuntime, ref: AdapterRef) -> str | None:
        if ref.uri is None:
            return None
        if ref.uri.startswith("mem://"):
            key = ref.uri[len("mem://"):]
            if key not in runtime.lora.specs:
                raise BadRequest(
                    f"sampler weights {key!r} are no longer in memory (only the newest snapshots per model "
                    "are kept); call save_weights_and_get_sampling_client again or save named sampler weights"
                )
            return key
        key = f"dir:{ref.uri}"
        if key not in runtime.lora.specs:
            spec, state = read_peft_adapter(Path(ref.uri))
            runtime.lora.load(key, spec, state)
        return key

    @torch.no_grad()
    def sample(
        self, adapter: AdapterRef, prompt: list[int], num_samples: int, params: SamplingParams,
        prompt_logprobs: bool = False,
    ) -> SampleResult:
        runtime = self._runtime(adapter.base_model)
        key = self._adapter_key(runtime, adapter)
        if not prompt:
            raise BadRequest("prompt: at least one token is required")
        if num_samples < 1:
            raise BadRequest(f"num_samples must be >= 1, got {num_samples}")
        check_token_range(np.asarray(prompt), runtime.vocab_size, "prompt")
        if len(prompt) + params.max_tokens > runtime.max_context:
            raise BadRequest(
                f"prompt ({len(prompt)} tokens) + sampling_params.max_tokens ({params.max_tokens}) exceeds the "
                f"model's context of {runtime.max_context}"
            )
        stop_tokens = set(params.stop_tokens) | (set(runtime.eos_token_ids) if params.stop_at_eos else set())
        stop_strings = params.stop_strings
        if stop_strings and runtime.tokenizer is None:
            raise BadRequest("sampling_params.stop: stop strings need a tokenizer, and this model has none")
        base_seed = params.seed if params.seed is not None else secrets.randbits(62)
        generators = [torch.Generator().manual_seed(base_seed + i) for i in range(num_samples)]

        prompt_t = torch.tensor([prompt], dtype=torch.long, device=runtime.device)
        result = SampleResult(sequences=[])
        if prompt_logprobs:
            mask = torch.ones_like(prompt_t)
            full = runtime.logits(prompt_t, mask, [key])[0]  # (T, V)
            lp = full[:-1].log_softmax(-1).gather(-1, prompt_t[0, 1:, None])[:, 0]
            result.prompt_logprobs = [math.nan] + lp.tolist()
        logits, cache = runtime.step(prompt_t, None, [key])  # (1, V)
        cache.batch_repeat_interleave(num_samples)
        logits = logits.expand(num_samples, -1)
        tokens: list[list[int]] = [[] for _ in range(num_samples)]
        logprobs: list[list[float]] = [[] for _ in range(num_samples)]
        done = [False] * num_samples
        stop_reason = ["length"] * num_samples
        for _ in range(params.max_tokens):
            chosen = choose_tokens(logits, params, generators)  # (N,)
            chosen_lp = logits.log_softmax(-1).gather(-1, chosen[:, None])[:, 0]
            for i in range(num_samples):
                if done[i]:
                    continue
                tokens[i].append(int(chosen[i]))
                logprobs[i].append(float(chosen_lp[i]))
                if tokens[i][-1] in stop_tokens or _ends_with_stop_string(runtime, tokens[i], stop_strings):
                    done[i], stop_reason[i] = True, "stop"
            if all(done):
                break
            logits, cache = runtime.step(chosen[:, None], cache, [key] * num_samples)
        result.sequences = [SampledSequence(t, l, r) for t, l, r in zip(tokens, logprobs, stop_reason)]
        return result


def _ends_with_stop_string(runtime: ModelRuntime, tokens: list[int], stop_strings: tuple[str, ...]) -> bool:
    if not stop_strings:
        return False
    longest = max(len(s) for s in stop_strings)
    tail = runtime.tokenizer.decode(tokens[-(longest + 8):])  # a token is at least one character
    return any(s in tail for s in stop_strings)


def choose_tokens(logits_N_V: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
    """Pick one token per row: greedy at temperature 0, else temperature, top-k, top-p, then a draw."""
    if params.temperature == 0:
        return logits_N_V.argmax(-1)
    z = logits_N_V / params.temperature
    if params.top_k > 0 and params.top_k < z.shape[-1]:
        kth = z.topk(params.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_z, order = z.sort(dim=-1, descending=True)
        probs = sorted_z.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    probs = z.softmax(-1)
    return torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)])
