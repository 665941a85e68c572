"""Inflight sampling on the vLLM path (fake vLLM): an inflight save publishes a new version folder and every
inflight session of the run moves to it, so their next requests sample the newest weights; a snapshot session
stays on its version. (A generation vLLM is running finishes on the version it started with.)"""

from __future__ import annotations

from tests.app_client import future_result
from tests.control.test_journal import _sample as _sample_async
from tests.control.test_lifecycle import Run
from tests.vllm.test_vllm_lifecycle import _vllm_app


def _tokens(client, sampler_id):
    return future_result(client, _sample_async(client, sampler_id))["sequences"][0]["tokens"]


def test_inflight_sessions_move_to_each_new_version_and_snapshots_stay(tmp_path, fake):
    client = _vllm_app(tmp_path, fake)
    try:
        with client:
            store = client.app.state.tinkerd.store
            run = Run(client)
            run.train_step()
            first = run.call("save_weights_for_sampler", sampling_session_seq_id=0, kind="inflight")["sampling_session_id"]
            snapshot = run.sampler(1)
            v1 = store.sampling_session(first)["adapter_uri"]
            assert store.sampling_session(snapshot)["adapter_uri"] == v1  # unchanged weights: the same version
            w1 = _tokens(client, snapshot)
            for _ in range(3):
                run.train_step()
            second = run.call("save_weights_for_sampler", sampling_session_seq_id=2, kind="inflight")["sampling_session_id"]
            v2 = store.sampling_session(second)["adapter_uri"]
            assert v2 != v1 and store.sampling_session(first)["adapter_uri"] == v2
            assert store.sampling_session(snapshot)["adapter_uri"] == v1
            w2 = _tokens(client, second)
            assert w2 != w1, "training did not change the seeded sample; the test cannot tell the versions apart"
            assert _tokens(client, first) == w2
            assert _tokens(client, snapshot) == w1
    finally:
        client.vllm.close()
