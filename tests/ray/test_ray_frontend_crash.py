"""kill -9 of a `tinkerd serve --engine ray` front end under an SDK loop, its engine actor living on in
the cluster: the restarted front end re-attaches, rebuilds the run in the actor from its snapshot and
journal, and the unchanged SDK loop finishes equal to an uninterrupted run (the real embedded model).

Tier 1: needs the ray extra (`make test-ray`); skipped when ray is not installed.
"""

from __future__ import annotations

import pytest

from tests.ray.cluster import RAY_ENV, ensure_ray

pytestmark = [pytest.mark.ray, pytest.mark.slow]

from tests.e2e.conftest import no_sdk_session_outlives_its_server  # noqa: E402, F401  (autouse here too)
from tests.e2e.test_crash_recovery_e2e import kill_mid_loop_and_compare  # noqa: E402
from tinkerd.backends.ray_engine import remove  # noqa: E402


def test_kill_9_of_the_front_end_the_actor_lives_on_and_the_sdk_loop_finishes_exactly(tmp_path, monkeypatch):
    address = ensure_ray()
    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    try:
        log = kill_mid_loop_and_compare(tmp_path / "data", "--engine", "ray", "--ray-address", address,
                                        "--snapshot-every", "2")
        assert "attached to" in log  # the restarted front end found the actor holding the run
    finally:
        remove("embedded@auto")  # the actor `serve --engine ray` started for the embedded model
