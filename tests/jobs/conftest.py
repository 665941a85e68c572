"""Job tests. Those marked `jobs_heavy` train the embedded model for a minute or more each (dpo, rl, the crash
test): they run with `make test-jobs` (TINKERD_JOB_TESTS=1) and are skipped by plain `make test`."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TINKERD_JOB_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="trains the embedded model for minutes: make test-jobs")
    for item in items:
        if "jobs_heavy" in item.keywords:
            item.add_marker(skip)
