"""Shared fixtures: a tiny random Llama (2 layers) for engine unit tests; no files, no network."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")


def make_tiny_model(seed: int = 0):
    """A 2-layer random Llama with tied embeddings (vocab 128, context 64), plain Hugging Face."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, eos_token_id=1,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def make_tiny_runtime(name: str = "tiny", seed: int = 0, dtype=None):
    from tinkerd.engine.runtime import ModelRuntime

    model = make_tiny_model(seed)
    if dtype is not None:
        model = model.to(dtype)
    return ModelRuntime(name, model)


def tiny_runtimes(name: str = "tiny", seed: int = 0) -> dict:
    """{name: tiny runtime}: the loader of engines that build their runtimes in other processes."""
    return {name: make_tiny_runtime(name, seed)}


@pytest.fixture
def tiny_runtime():
    return make_tiny_runtime()


@pytest.fixture
def api(tmp_path):
    """A TestClient of the app on a tiny random model (`tests.app_client`)."""
    from tests.app_client import app_client

    yield from app_client(tmp_path)
