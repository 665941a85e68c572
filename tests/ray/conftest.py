"""Each Ray test leaves the session's 2-CPU cluster as it found it: an engine actor or placement group left
behind holds a CPU, and a later test's actor then waits forever for one (one leak per CPU is enough)."""

from __future__ import annotations

import importlib.util

import pytest


def _engines() -> set[str]:
    if importlib.util.find_spec("ray") is None:
        return set()
    import ray

    if not ray.is_initialized():
        return set()
    from tests.ray.cluster import engines_left

    return set(engines_left())


@pytest.fixture(autouse=True)
def leaves_no_engine_behind():
    before = _engines()
    yield  # autouse: set up first, so this check runs after the test's own fixtures are torn down
    left = sorted(_engines() - before)
    assert not left, f"the test left engines in the cluster: {left}"
