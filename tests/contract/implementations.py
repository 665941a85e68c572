"""The engines the contract suite runs on: name -> factory. Add an entry to run the suite on yours.

A factory gets the name of the tiny base model to serve and returns an `EngineUnderTest`. The
model must be `tests.conftest.make_tiny_runtime(name, seed=TINY_SEED)` so tests can compute
reference values in-process. Factories of optional backends call `pytest.importorskip` first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest

from tests.conftest import make_tiny_runtime

TINY_SEED = 0


@dataclass
class EngineUnderTest:
    trainer: Any  # a tinkerd.engine.interface.Trainer, wrapped in the engine's fence
    sampler: Any  # a tinkerd.engine.interface.Sampler
    close: Callable[[], None] = lambda: None


def embedded(base_model: str) -> EngineUnderTest:
    from tinkerd.backends.fencing import FencedTrainer
    from tinkerd.engine.sampler import LocalSampler
    from tinkerd.engine.trainer import LocalTrainer

    runtimes = {base_model: make_tiny_runtime(base_model, seed=TINY_SEED)}
    return EngineUnderTest(FencedTrainer(LocalTrainer(runtimes)), LocalSampler(runtimes))


def vllm_fake(base_model: str) -> EngineUnderTest:
    """The embedded trainer publishing adapter folders, sampled through `VllmSampler` and the fake vLLM server."""
    import shutil
    import tempfile
    from pathlib import Path

    from tests.vllm.conftest import FAST_RETRY
    from tests.vllm.fake_vllm import FakeVllm
    from tinkerd.backends.versions import AdapterVersions, VersionedTrainer
    from tinkerd.backends.fencing import FencedTrainer
    from tinkerd.engine.sampler import LocalSampler
    from tinkerd.engine.trainer import LocalTrainer
    from tinkerd.backends.vllm_sampler import VllmSampler

    data_dir = Path(tempfile.mkdtemp(prefix="tinkerd-vllm-contract-"))
    served = f"{base_model}-served"
    fake = FakeVllm(LocalSampler({base_model: make_tiny_runtime(base_model, seed=TINY_SEED)}), served, base_model).start()
    versions = AdapterVersions(data_dir / "adapters")
    trainer = VersionedTrainer(LocalTrainer({base_model: make_tiny_runtime(base_model, seed=TINY_SEED)}), versions)
    sampler = VllmSampler(fake.url, {base_model: served}, versions, retry=FAST_RETRY)

    def close() -> None:
        sampler.close()
        fake.stop()
        shutil.rmtree(data_dir, ignore_errors=True)

    return EngineUnderTest(FencedTrainer(trainer), sampler, close)


def ray_one_actor(base_model: str) -> EngineUnderTest:
    pytest.importorskip("ray")
    from tests.ray.cluster import tiny_ray_engine

    return tiny_ray_engine(base_model, seed=TINY_SEED)


def fsdp_two_ranks(base_model: str) -> EngineUnderTest:
    """An FSDP2 group of 2 gloo ranks publishing adapter folders, sampled by the embedded sampler in this process."""
    import shutil
    import tempfile
    from pathlib import Path

    from tests.conftest import tiny_runtimes
    from tinkerd.backends.versions import AdapterVersions, VersionedTrainer
    from tinkerd.backends.fencing import FencedTrainer
    from tinkerd.backends.fsdp_group import FsdpTrainerGroup
    from tinkerd.engine.sampler import LocalSampler

    data_dir = Path(tempfile.mkdtemp(prefix="tinkerd-fsdp-contract-"))
    group = FsdpTrainerGroup(2, tiny_runtimes, (base_model, TINY_SEED))
    trainer = VersionedTrainer(group, AdapterVersions(data_dir / "adapters"))

    def close() -> None:
        group.close()
        shutil.rmtree(data_dir, ignore_errors=True)

    return EngineUnderTest(FencedTrainer(trainer), LocalSampler(tiny_runtimes(base_model, TINY_SEED)), close)


IMPLEMENTATIONS: dict[str, Callable[[str], EngineUnderTest]] = {"embedded": embedded, "vllm-fake": vllm_fake,
                                                               "ray": ray_one_actor, "fsdp": fsdp_two_ranks}
MARKS = {"ray": [pytest.mark.ray]}
