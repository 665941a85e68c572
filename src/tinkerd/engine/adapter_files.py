"""Adapter folders on disk in the standard PEFT layout (adapter_config.json + adapter_model.safetensors).

A training-state checkpoint adds `optimizer.safetensors` (AdamW moments and step per parameter)
and `tinkerd_state.json`. Everything is written to a temporary folder, fsynced and renamed into
place, so a crash never leaves half a checkpoint. Knows nothing about where checkpoints live or
who owns them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tinkerd.engine.interface import AdapterSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "tinkerd_state.json"


def write_peft_adapter(
    directory: Path, state: dict[str, torch.Tensor], spec: AdapterSpec, base_model: str, target_names: list[str],
    optimizer: dict[str, torch.Tensor] | None = None, meta: dict | None = None,
) -> None:
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in target_names}),
    }
    state_meta = {"spec": {"seed": spec.seed, "train_attn": spec.train_attn, "train_mlp": spec.train_mlp,
                           "train_unembed": spec.train_unembed}, "base_model": base_model, **(meta or {})}
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    try:
        save_file({k: v.float().contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if optimizer is not None:
            save_file({k: v.contiguous() for k, v in optimizer.items()}, str(tmp / OPTIMIZER_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state_meta, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_peft_adapter(directory: Path) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    extra = {}
    if (directory / STATE_FILE).is_file():
        extra = json.loads((directory / STATE_FILE).read_text()).get("spec", {})
    spec = AdapterSpec(
        rank=int(config["r"]),
        alpha=float(config.get("lora_alpha", 32)),
        seed=extra.get("seed"),
        train_attn=extra.get("train_attn", True),
        train_mlp=extra.get("train_mlp", True),
        train_unembed=extra.get("train_unembed", True),
    )
    return spec, load_file(str(directory / WEIGHTS_FILE))


def read_training_extras(directory: Path) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """The optimizer tensors (None if the checkpoint has none) and tinkerd's metadata of a checkpoint."""
    directory = Path(directory)
    optimizer = load_file(str(directory / OPTIMIZER_FILE)) if (directory / OPTIMIZER_FILE).is_file() else None
    meta = json.loads((directory / STATE_FILE).read_text()) if (directory / STATE_FILE).is_file() else {}
    return optimizer, meta
