"""Exporting adapters: merging a PEFT LoRA adapter folder into its base model as a plain HF model.

`merge_adapter_into_model` loads the base Hugging Face causal LM in fp32, adds
`scale * (B @ A)` to every linear layer the adapter targets (scale = lora_alpha / r, or
lora_alpha / sqrt(r) with `use_rslora`), and saves a complete model folder with `save_pretrained`
plus the base folder's tokenizer files (copied byte for byte; skipped when the base has none).
When the adapter targets an output layer tied to the input embeddings, the output layer gets its
own weight first (the embeddings stay as they were) and the saved config says the weights are not
tied. The folder is written next to the destination and renamed into place, so a crash never
leaves half a model.

Knows the PEFT file layout (adapter_config.json, adapter_model.safetensors with keys
`base_model.model.<module>.lora_A.weight` (r, in) and `lora_B.weight` (out, r)) and nothing about
checkpoints, owners or the Store. Does not handle LoRA on embeddings, DoRA, or `fan_in_fan_out`
adapters (tinkerd never writes those); they are refused with a ValueError.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PEFT_PREFIX = "base_model.model."
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)
DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16"}


def lora_deltas(adapter_folder: Path) -> dict[str, "torch.Tensor"]:
    """{module path: scale * (B @ A)} (out, in) fp32 for every module the adapter targets."""
    import torch
    from safetensors.torch import load_file

    adapter_folder = Path(adapter_folder)
    config = json.loads((adapter_folder / "adapter_config.json").read_text())
    if config.get("fan_in_fan_out") or config.get("use_dora"):
        raise ValueError(f"{adapter_folder}: fan_in_fan_out and DoRA adapters are not supported")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    state = load_file(str(adapter_folder / "adapter_model.safetensors"))
    deltas = {}
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        module = module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module
        b = state.get(key[: -len(".lora_A.weight")] + ".lora_B.weight")
        if b is None:
            raise ValueError(f"{adapter_folder}: {key} has no matching lora_B")
        deltas[module] = scale * (b.to(torch.float32) @ a.to(torch.float32))
    if not deltas:
        raise ValueError(f"{adapter_folder}: the adapter has no lora_A/lora_B tensors")
    return deltas


def merge_adapter_into_model(base_folder: Path, adapter_folder: Path, out_folder: Path,
                             dtype: str = "fp32") -> Path:
    """Write base + adapter as one Hugging Face model folder at `out_folder` (replaced if present)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    base_folder, out_folder = Path(base_folder), Path(out_folder)
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    deltas = lora_deltas(adapter_folder)
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    output = model.get_output_embeddings()
    output_name = next((name for name, m in model.named_modules() if m is output), None)
    if output_name in deltas and output.weight is model.get_input_embeddings().weight:
        output.weight = nn.Parameter(output.weight.detach().clone())
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False
    with torch.no_grad():
        for name, delta in deltas.items():
            try:
                module = model.get_submodule(name)
            except AttributeError as exc:
                raise ValueError(f"the adapter targets {name!r}, which {base_folder} does not have") from exc
            if not isinstance(module, nn.Linear) or tuple(module.weight.shape) != tuple(delta.shape):
                raise ValueError(f"the adapter's {name!r} ({tuple(delta.shape)}) does not fit the base model's "
                                 f"{type(module).__name__} {tuple(getattr(module, 'weight', delta).shape)}")
            module.weight.add_(delta)
    model = model.to(getattr(torch, DTYPE_NAMES[dtype]))

    out_folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".merge-", dir=out_folder.parent))
    try:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (base_folder / name).is_file():
                shutil.copyfile(base_folder / name, tmp / name)
        if out_folder.exists():
            shutil.rmtree(out_folder)
        os.replace(tmp, out_folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_folder
