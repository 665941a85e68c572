"""One local Ray cluster per test session, and tiny-model engine actors on it (tier 1 tests).

The cluster is started on first use with the settings measured in reference/scale-out.md 3.4:
2 CPUs, no dashboard, a 256 MiB object store, no usage stats, token auth off (a second driver,
e.g. a front end in a subprocess, can attach). Ray's own atexit hook stops it.
"""

from __future__ import annotations

import os
import uuid

import pytest

ray = pytest.importorskip("ray")

from tests.contract.implementations import EngineUnderTest  # noqa: E402

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def driver_env(root) -> dict:
    """The environment of a subprocess driver: RAY_ENV, and `root` ahead of the caller's PYTHONPATH (kept, so a
    checkout whose src/ is on the path, e.g. a git worktree sharing another checkout's venv, imports its own code)."""
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **RAY_ENV, "PYTHONPATH": path}


def ensure_ray() -> str:
    """Start the session's cluster if needed; returns its GCS address for other drivers."""
    if not ray.is_initialized():
        os.environ.update(RAY_ENV)
        # address="local": a cluster of this session's own, never another one on the machine (without it
        # ray.init joins the latest cluster started here, e.g. a concurrent test run's)
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
                 logging_level="warning", log_to_driver=False)
    return ray.get_runtime_context().gcs_address


def engines_left() -> list[str]:
    """The engine actors and placement groups alive in the cluster, in any namespace (a test leaves none)."""
    from ray.util import list_named_actors
    from ray.util.placement_group import placement_group_table

    actors = [f"actor {a['namespace']}/{a['name']}" for a in list_named_actors(all_namespaces=True)
              if a["name"].startswith("engine-")]
    groups = [f"placement group {info['name']} ({info['state']})" for info in placement_group_table().values()
              if info["name"].startswith("engine-") and info["state"] != "REMOVED"]
    return actors + groups


def tiny_runtimes(name: str, seed: int) -> dict:
    """Runs in the actor: the contract suite's tiny random model."""
    from tests.conftest import make_tiny_runtime

    return {name: make_tiny_runtime(name, seed=seed)}


def tiny_placement(base_model: str, seed: int = 0, **options):
    """A placement under a fresh key (tests never share actors by accident)."""
    from ray import cloudpickle  # the copy Ray itself pickles with

    import tests.conftest
    import tests.ray.cluster
    from tinkerd.backends.ray_engine import ActorPlacement

    for module in (tests.conftest, tests.ray.cluster):  # the worker cannot import the tests package
        cloudpickle.register_pickle_by_value(module)
    return ActorPlacement(f"test-{base_model}-{uuid.uuid4().hex[:8]}", tiny_runtimes, (base_model, seed), **options)


def tiny_ray_engine(base_model: str, seed: int = 0) -> EngineUnderTest:
    from tinkerd.backends.ray_engine import RaySampler, RayTrainer, remove, start_or_attach

    ensure_ray()
    placement = tiny_placement(base_model, seed)
    trainer = RayTrainer([start_or_attach(placement)])
    return EngineUnderTest(trainer, RaySampler(trainer), close=lambda: remove(placement.key))
