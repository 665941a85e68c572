"""One loaded base model: frozen weights in the compute dtype, its tokenizer, and its LoRA adapters.

Gives the trainer and the sampler the two passes they need: full-sequence logits for training
and scoring, and incremental (KV-cached) steps for decoding. Knows nothing about losses,
optimizers or sampling rules.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from tinkerd.engine.base_models import BaseModelFiles
from tinkerd.engine.lora import LoRAAdapters

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


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
    def load(cls, files: BaseModelFiles, dtype: str = "bf16", device: str = "cpu") -> "ModelRuntime":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(files.folder, dtype=DTYPES[dtype]).to(device)
        tokenizer = AutoTokenizer.from_pretrained(files.folder)
        log.info("loaded %s (%s, %s) in %.1f s", files.name, dtype, device, time.perf_counter() - started)
        return cls(files.name, model, tokenizer)

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

    def step(self, tokens_B_T: torch.Tensor, cache, adapters: list[str | None], *, mask_B_L: torch.Tensor | None = None,
             positions_B_T: torch.Tensor | None = None, all_positions: bool = False):
        """Run new tokens through the KV cache (None = start one).

        Returns fp32 logits of the last position (B, V), or of every new position (B, T, V) with
        `all_positions`, and the cache. `mask_B_L` covers cached plus new columns (0 = padding);
        `positions_B_T` are the rotary positions of the new tokens when rows are left-padded.
        """
        with self.lora.router.route(adapters):
            out = self.backbone(input_ids=tokens_B_T, past_key_values=cache, use_cache=True,
                                attention_mask=mask_B_L, position_ids=positions_B_T)
            hidden = out.last_hidden_state if all_positions else out.last_hidden_state[:, -1]
            return self.head(hidden).float(), out.past_key_values
