"""The SDK's RestClient, unmodified, against a real tinkerd process: runs, checkpoints, publish, TTL,
delete, weights_info and sessions."""

from __future__ import annotations

import time

import pytest
import tinker

from tests.e2e.conftest import EMBEDDED

pytestmark = pytest.mark.slow


def test_rest_client_manages_runs_and_checkpoints(server):
    service = tinker.ServiceClient(base_url=server.url, api_key="tml-rest-e2e")
    training = service.create_lora_training_client(base_model=EMBEDDED, rank=4, seed=0,
                                                   user_metadata={"renderer_name": "qwen3_instruct"}).result()
    run_id = training.model_id
    state = training.save_state("rest-state").result().path
    snap = training.save_weights_for_sampler("rest-snap").result().path
    with pytest.warns(FutureWarning, match="create_rest_client"):  # deprecated in 0.38 in favour of RestClient()
        rest = service.create_rest_client()

    runs = rest.list_training_runs().result()
    assert run_id in [r.training_run_id for r in runs.training_runs] and runs.cursor.total_count >= 1
    run = rest.get_training_run(run_id).result()
    assert run.user_metadata == {"renderer_name": "qwen3_instruct"}
    assert (run.base_model, run.is_lora, run.lora_rank) == (EMBEDDED, True, 4)
    assert run.last_checkpoint.tinker_path == state and run.last_sampler_checkpoint.tinker_path == snap
    assert rest.get_training_run_by_tinker_path(snap).result().training_run_id == run_id

    listed = {c.tinker_path: c for c in rest.list_checkpoints(run_id).result().checkpoints}
    assert set(listed) == {state, snap}
    assert listed[state].checkpoint_type == "training" and listed[snap].checkpoint_id == "sampler_weights/rest-snap"
    assert all(c.size_bytes and not c.public for c in listed.values())
    mine = rest.list_user_checkpoints().result()
    assert {state, snap} <= {c.tinker_path for c in mine.checkpoints}

    info = rest.get_weights_info_by_tinker_path(snap).result()
    assert (info.base_model, info.is_lora, info.lora_rank) == (EMBEDDED, True, 4)

    # Another key: nothing until published, then weights_info of the published checkpoint only.
    other = tinker.RestClient(base_url=server.url, api_key="tml-rest-e2e-other")
    with pytest.raises(tinker.NotFoundError):
        other.get_weights_info_by_tinker_path(snap).result()
    rest.publish_checkpoint_from_tinker_path(snap).result()
    assert other.get_weights_info_by_tinker_path(snap).result().lora_rank == 4
    assert [c.public for c in rest.list_checkpoints(run_id).result().checkpoints if c.tinker_path == snap] == [True]
    rest.unpublish_checkpoint_from_tinker_path(snap).result()
    with pytest.raises(tinker.NotFoundError):
        other.get_weights_info_by_tinker_path(snap).result()

    rest.set_checkpoint_ttl_from_tinker_path(state, 3600).result()
    expires = [c.expires_at for c in rest.list_checkpoints(run_id).result().checkpoints if c.tinker_path == state]
    assert expires[0] is not None and 3500 < expires[0].timestamp() - time.time() <= 3600
    rest.set_checkpoint_ttl_from_tinker_path(state, None).result()

    rest.delete_checkpoint_from_tinker_path(snap).result()
    assert [c.tinker_path for c in rest.list_checkpoints(run_id).result().checkpoints] == [state]
    with pytest.raises(tinker.NotFoundError):
        rest.get_weights_info_by_tinker_path(snap).result()

    session_id = run_id.split(":")[0]
    assert session_id in rest.list_sessions().result().sessions
    assert rest.get_session(session_id).result().training_run_ids == [run_id]
