"""One loaded base model: frozen weights in the compute dtype, its tokenizer, and its LoRA adapters.

Gives the trainer and the sampler full-sequence logits and target logprobs (the sampler's
incremental decoding over a KV cache is `decoder`). Knows nothing about losses, optimizers or
sampling rules.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from tinkerd.engine.base_models import BaseModelFiles, resolve_base_model
from tinkerd.engine.kernels import fused_norm, packed_gemm
from tinkerd.engine.lora import LoRAAdapters

log = logging.getLogger(__name__)

# Positions per unembedding chunk. bf16 (AMX): 64 rows x 49k vocab x 4 bytes = 12.6 MB of fp32 log-softmax,
# which stays in cache. fp32 multiplies too slowly for that to matter and small-M GEMMs parallelise badly:
# the unembedding forward + backward of 2048 SmolLM2 positions took 5.9 s in 64-row chunks, 4.8 s in 512-row
# chunks on one AVX2 core (9.3 s vs 5.1 s on two).
LOGPROB_CHUNK = {torch.bfloat16: 64, torch.float32: 512}
# Under autograd each chunk keeps its fp32 log-softmax for the backward pass while the whole pass
# keeps at most this many bytes of them; past it, chunks are recomputed in the backward instead
# (one more unembedding matmul per chunk, O(chunk x vocab) memory).
KEEP_LOGSOFTMAX_BYTES = 1 << 30

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """`auto`: bf16 where the hardware multiplies bf16 natively (a CUDA GPU that supports it; a CPU with
    AVX-512 BF16 or AMX, which oneDNN uses), else fp32. Without that support torch falls back to a plain
    loop for bf16 matmuls: on an AVX2-only CPU a 2048x576x1536 product took 3.9 s in bf16, 0.16 s in fp32."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


class ModelRuntime:
    def __init__(self, name: str, model: nn.Module, tokenizer=None, tokenizer_id: str | None = None) -> None:
        self.name = name
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenizer_id = tokenizer_id or name
        self.lora = LoRAAdapters(self.model)
        self.backbone = self.model.base_model  # the decoder stack without the LM head
        self.head = self.model.get_output_embeddings()
        self.config = self.model.config
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype

    @classmethod
    def load(cls, files: BaseModelFiles, dtype: str = "auto", device: str = "cpu",
             compile_norms: bool = True, packed_gemms: str = "auto") -> "ModelRuntime":
        """`dtype`: bf16, fp32 or auto (`resolve_dtype`). `compile_norms`: RMSNorm layers as compiled kernels
        (`tinkerd.engine.kernels.fused_norm`), compiled here. `packed_gemms`: auto, on or off
        (`tinkerd.engine.kernels.packed_gemm`; off where something else owns the weights, e.g. FSDP shards)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.perf_counter()
        dtype = resolve_dtype(dtype, device)
        model = AutoModelForCausalLM.from_pretrained(files.folder, dtype=DTYPES[dtype]).to(device)
        tokenizer = AutoTokenizer.from_pretrained(files.folder)
        log.info("loaded %s (%s, %s) in %.1f s", files.name, dtype, device, time.perf_counter() - started)
        runtime = cls(files.name, model, tokenizer)
        packed_gemm.install(runtime.model, packed_gemms)
        if compile_norms and fused_norm.install(model):
            started = time.perf_counter()
            fused_norm.warm_up(int(runtime.config.hidden_size), runtime.dtype, runtime.device)
            log.info("compiled RMSNorm kernels in %.1f s", time.perf_counter() - started)
        return runtime

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if ids is None:
            ids = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        if ids is None:
            return ()
        return tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)

    def logits(self, tokens_B_T: torch.Tensor, mask_B_T: torch.Tensor, adapters: list[str | None]) -> torch.Tensor:
        """fp32 logits for every position of a right-padded batch; row i uses adapter `adapters[i]`."""
        with self.lora.router.route(adapters):
            hidden = self.backbone(input_ids=tokens_B_T, attention_mask=mask_B_T).last_hidden_state
            return self.head(hidden).float()  # (B, T, V)

    def target_logprobs(self, tokens_B_T: torch.Tensor, mask_B_T: torch.Tensor, adapters: list[str | None],
                        targets_B_T_K: torch.Tensor) -> torch.Tensor:
        """log p(target) for every position, (B, T, K) fp32, without materialising (B, T, V) logits.

        The unembedding and log-softmax run over chunks of positions, so the vocabulary-wide
        elementwise work stays in cache. Under autograd the chunks' log-softmax is kept for the
        backward pass up to KEEP_LOGSOFTMAX_BYTES per pass; bigger passes recompute each chunk in
        the backward instead (checkpointed), so memory stays O(chunk x vocab).
        """
        with self.lora.router.route(adapters):
            hidden = self.backbone(input_ids=tokens_B_T, attention_mask=mask_B_T).last_hidden_state
            B, T, H = hidden.shape
            flat_hidden, flat_targets = hidden.reshape(B * T, H), targets_B_T_K.reshape(B * T, -1)
            route = chunk_bounds(B * T, LOGPROB_CHUNK.get(self.dtype, 64))
            # Each chunk keeps its rows' adapters: rows of the flattened batch map back to batch rows.
            row_adapters = [adapters[i // T] for i in range(B * T)] if len(set(adapters)) > 1 else None
            keep = B * T * self.vocab_size * 4 <= KEEP_LOGSOFTMAX_BYTES
            piece = _chunk_logprobs if keep or not torch.is_grad_enabled() else _checkpointed_chunk_logprobs
            pieces = []
            for start, end in route:
                chunk_adapters = row_adapters[start:end] if row_adapters is not None else adapters[:1]
                pieces.append(piece(self, flat_hidden[start:end], flat_targets[start:end], chunk_adapters))
            return torch.cat(pieces).reshape(B, T, -1)


def chunk_bounds(total: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of consecutive chunks of at most `size` rows, none of exactly 32 rows: oneDNN 3.12's
    AMX bf16 kernel dies with SIGFPE on a single thread for (32 x 49152) @ (49152 x n), the
    unembedding backward of 49152-token vocabularies such as SmolLM2's."""
    bounds = [(start, min(start + size, total)) for start in range(0, total, size)]
    if bounds and bounds[-1][1] - bounds[-1][0] == 32:
        start, end = bounds.pop()
        if bounds:
            bounds[-1] = (bounds[-1][0], end)  # fold into the previous chunk
        else:
            bounds = [(start, end - 1), (end - 1, end)]
    return bounds


def _chunk_logprobs(runtime: ModelRuntime, hidden_N_H: torch.Tensor, targets_N_K: torch.Tensor,
                    adapters: list[str | None]) -> torch.Tensor:
    with runtime.lora.router.route(adapters):
        logits = runtime.head(hidden_N_H)  # (N, V) in the compute dtype
    return torch.log_softmax(logits, -1, dtype=torch.float32).gather(-1, targets_N_K)  # one fused pass each way


def _checkpointed_chunk_logprobs(runtime: ModelRuntime, hidden_N_H, targets_N_K, adapters):
    from torch.utils.checkpoint import checkpoint

    return checkpoint(_chunk_logprobs, runtime, hidden_N_H, targets_N_K, adapters, use_reentrant=False)


def load_runtimes(specs: list[str | None], model_cache: Path, dtype: str = "auto", device: str = "cpu",
                  compile_norms: bool = True, packed_gemms: str = "auto") -> dict[str, ModelRuntime]:
    """{served name: runtime} for every `--base-model` spec (None: the embedded model), resolved as `serve`
    does (`base_models.resolve_base_model`) and loaded with `ModelRuntime.load`."""
    runtimes = {}
    for spec in specs:
        files = resolve_base_model(spec, Path(model_cache))
        runtimes[files.name] = ModelRuntime.load(files, dtype=dtype, device=device, compile_norms=compile_norms,
                                                 packed_gemms=packed_gemms)
    return runtimes
