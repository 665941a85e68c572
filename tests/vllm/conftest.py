"""Fixtures for the vLLM sampler path: a tiny trainer publishing folders, and a fake vLLM over a
second copy of the same tiny model (same seed, so the base weights are identical)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import make_tiny_runtime
from tests.vllm.fake_vllm import FakeVllm
from tinkerd.backends.versions import AdapterVersions, VersionedTrainer
from tinkerd.engine.interface import AdapterSpec
from tinkerd.engine.sampler import LocalSampler
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.backends.vllm_sampler import RetryPolicy, VllmSampler
from tinkerd.protocol.types import AdamParams, Datum, ForwardBackwardCall

FAST_RETRY = RetryPolicy(attempts=3, backoff_seconds=0.01, timeout_seconds=30.0)


def train_steps(trainer, model_id: str, steps: int, tokens=(3, 5, 7, 9, 11, 13, 15), lr: float = 5e-2) -> None:
    tokens = np.asarray(tokens, dtype=np.int64)
    datum = Datum(tokens[:-1], {"target_tokens": tokens[1:], "weights": np.ones(len(tokens) - 1, dtype=np.float32)})
    for _ in range(steps):
        # seq_id 0: unordered, so a fenced (Ray) trainer runs each step instead of answering a repeat from its cache
        trainer.forward_backward(ForwardBackwardCall(model_id, 0, "cross_entropy", {}, False, [datum]))
        trainer.optim_step(model_id, AdamParams(learning_rate=lr))


@pytest.fixture
def fake():
    server = FakeVllm(LocalSampler({"tiny": make_tiny_runtime("tiny")}), served_name="tiny-served",
                      base_model="tiny", max_loras=2).start()
    yield server
    server.stop()


@pytest.fixture
def versions(tmp_path):
    return AdapterVersions(tmp_path / "adapters", keep=1)


@pytest.fixture
def trainer(versions):
    inner = LocalTrainer({"tiny": make_tiny_runtime("tiny")})
    inner.create_adapter("run", "tiny", AdapterSpec(rank=4, seed=0))
    return VersionedTrainer(inner, versions)


@pytest.fixture
def vllm(fake, versions):
    sampler = VllmSampler(fake.url, {"tiny": "tiny-served"}, versions, retry=FAST_RETRY)
    yield sampler
    sampler.close()
