"""The REST routes (training runs, checkpoints, publish, TTL, weights_info, sessions) in-process on a
tiny random model, validated against the SDK's own response types, plus the cross-key matrix."""

import hashlib
import sqlite3
from pathlib import Path

import pytest
from tinker import types

from tinkerd.control.checkpoints import purge_expired, readable_checkpoint
from tinkerd.control.plane import NotFound
from tinkerd.store.db import Store
from tinkerd.store.dialects import SQLite
from tests.app_client import future_result

KEY = {"X-API-Key": "tml-owner"}
OTHER = {"X-API-Key": "tml-someone-else"}


def _owner_of(headers) -> str:
    return hashlib.sha256(headers["X-API-Key"].encode()).hexdigest()[:24]




@pytest.fixture
def run(api):
    """A model with a `weights/state` and a `sampler_weights/snap` checkpoint, and an ephemeral sampler."""
    session = api.post("/api/v1/create_session", headers=KEY,
                       json={"tags": [], "user_metadata": {"who": "me"}}).json()["session_id"]
    fut = api.post("/api/v1/create_model", headers=KEY, json={
        "session_id": session, "model_seq_id": 0, "base_model": "tiny",
        "lora_config": {"rank": 4, "seed": 1, "train_unembed": False},
        "user_metadata": {"renderer_name": "qwen3_instruct", "step": 3}}).json()
    model_id = future_result(api, fut["request_id"])["model_id"]
    saves = [("/api/v1/save_weights", {"path": "state", "seq_id": 1}),
             ("/api/v1/save_weights_for_sampler", {"path": "snap", "seq_id": 2}),
             ("/api/v1/save_weights_for_sampler", {"sampling_session_seq_id": 0, "seq_id": 3})]
    for route, body in saves:
        fut = api.post(route, headers=KEY, json={"model_id": model_id, **body}).json()
        assert "error" not in future_result(api, fut["request_id"])
    return {"session": session, "model_id": model_id, "state": f"tinker://{model_id}/weights/state",
            "snap": f"tinker://{model_id}/sampler_weights/snap"}


def _ckpt_url(path: str, suffix: str = "") -> str:
    parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(path)
    return f"/api/v1/training_runs/{parsed.training_run_id}/checkpoints/{parsed.checkpoint_id}{suffix}"


def _get(api, url, headers=KEY, cast=None, **params):
    r = api.get(url, headers=headers, params=params)
    assert r.status_code == 200, r.text
    return cast.model_validate(r.json()) if cast else r.json()


def test_training_runs_and_checkpoints_match_the_sdk_types(api, run):
    runs = _get(api, "/api/v1/training_runs", cast=types.TrainingRunsResponse)
    assert [r.training_run_id for r in runs.training_runs] == [run["model_id"]]
    assert (runs.cursor.offset, runs.cursor.limit, runs.cursor.total_count) == (0, 20, 1)

    tr = _get(api, f"/api/v1/training_runs/{run['model_id']}", cast=types.TrainingRun)
    assert (tr.base_model, tr.is_lora, tr.corrupted, tr.lora_rank) == ("tiny", True, False, 4)
    assert tr.model_owner == "tml:organization_user:" + _owner_of(KEY) and tr.last_request_time.tzinfo is not None
    assert tr.user_metadata == {"renderer_name": "qwen3_instruct", "step": "3"}
    assert tr.last_checkpoint.tinker_path == run["state"] and tr.last_checkpoint.checkpoint_type == "training"
    assert tr.last_sampler_checkpoint.checkpoint_id == "sampler_weights/snap"

    listed = _get(api, f"/api/v1/training_runs/{run['model_id']}/checkpoints", cast=types.CheckpointsListResponse)
    by_path = {c.tinker_path: c for c in listed.checkpoints}
    assert set(by_path) == {run["state"], run["snap"]}
    snap = by_path[run["snap"]]
    assert (snap.checkpoint_type, snap.public, snap.expires_at) == ("sampler", False, None)
    assert snap.size_bytes > 0 and by_path[run["state"]].size_bytes > snap.size_bytes  # state has optimizer moments

    mine = _get(api, "/api/v1/checkpoints", cast=types.CheckpointsListResponse)
    assert {c.tinker_path for c in mine.checkpoints} == set(by_path) and mine.cursor.total_count == 2
    page = _get(api, "/api/v1/checkpoints", cast=types.CheckpointsListResponse, limit=1, offset=1)
    assert len(page.checkpoints) == 1 and page.cursor.total_count == 2

    info = types.WeightsInfoResponse.model_validate(
        api.post("/api/v1/weights_info", headers=KEY, json={"tinker_path": run["snap"]}).json())
    assert (info.base_model, info.is_lora, info.lora_rank) == ("tiny", True, 4)
    assert (info.train_unembed, info.train_mlp, info.train_attn) == (False, True, True)


def test_sessions(api, run):
    sessions = _get(api, "/api/v1/sessions", cast=types.ListSessionsResponse)
    assert sessions.sessions == [run["session"]]
    got = _get(api, f"/api/v1/sessions/{run['session']}", cast=types.GetSessionResponse)
    assert got.training_run_ids == [run["model_id"]]
    assert got.sampler_ids == [f"{run['session']}:sample:0"] and got.user_metadata == {"who": "me"}


def test_other_keys_see_nothing_until_published(api, run):
    st, other = api.st, _owner_of(OTHER)
    model_id = run["model_id"]
    assert _get(api, "/api/v1/training_runs", headers=OTHER)["training_runs"] == []
    assert _get(api, "/api/v1/checkpoints", headers=OTHER)["checkpoints"] == []
    assert _get(api, "/api/v1/sessions", headers=OTHER)["sessions"] == []
    for url in (f"/api/v1/training_runs/{model_id}", f"/api/v1/training_runs/{model_id}/checkpoints",
                f"/api/v1/sessions/{run['session']}"):
        r = api.get(url, headers=OTHER)
        assert r.status_code == 404 and r.json()["detail"], url
    r = api.post("/api/v1/weights_info", headers=OTHER, json={"tinker_path": run["snap"]})
    assert r.status_code == 404 and run["snap"] in r.json()["detail"]
    for method, suffix in (("POST", "/publish"), ("DELETE", "/publish"), ("DELETE", "")):
        assert api.request(method, _ckpt_url(run["snap"], suffix), headers=OTHER).status_code == 404
    assert api.put(_ckpt_url(run["snap"], "/ttl"), headers=OTHER, json={"ttl_seconds": 3600}).status_code == 404
    with pytest.raises(NotFound):
        readable_checkpoint(st, other, run["snap"])

    assert api.post(_ckpt_url(run["snap"], "/publish"), headers=KEY).status_code == 200
    assert api.post(_ckpt_url(run["snap"], "/publish"), headers=KEY).status_code == 200  # idempotent, never 409
    assert readable_checkpoint(st, other, run["snap"])["directory"]
    with pytest.raises(NotFound):
        readable_checkpoint(st, other, run["state"])  # only the published one
    info = api.post("/api/v1/weights_info", headers=OTHER, json={"tinker_path": run["snap"]})
    assert info.status_code == 200 and info.json()["lora_rank"] == 4
    public = _get(api, f"/api/v1/training_runs/{model_id}/checkpoints", headers=OTHER)["checkpoints"]
    assert [(c["tinker_path"], c["public"]) for c in public] == [(run["snap"], True)]
    assert api.get(f"/api/v1/training_runs/{model_id}", headers=OTHER).status_code == 404  # scope "owned"
    shared = _get(api, f"/api/v1/training_runs/{model_id}", headers=OTHER, cast=types.TrainingRun,
                  access_scope="accessible")
    assert shared.last_checkpoint is None and shared.last_sampler_checkpoint.public
    assert _get(api, "/api/v1/training_runs", headers=OTHER, access_scope="accessible")["cursor"]["total_count"] == 1
    assert api.delete(_ckpt_url(run["snap"]), headers=OTHER).status_code == 404  # still only the owner's to delete

    assert api.delete(_ckpt_url(run["snap"], "/publish"), headers=KEY).status_code == 200
    with pytest.raises(NotFound):
        readable_checkpoint(st, other, run["snap"])
    assert api.post("/api/v1/weights_info", headers=OTHER, json={"tinker_path": run["snap"]}).status_code == 404
    assert readable_checkpoint(st, _owner_of(KEY), run["snap"])["path"] == run["snap"]


def test_delete_removes_the_row_and_the_files(api, run):
    directory = Path(api.st.store.checkpoint(run["state"])["directory"])
    assert directory.is_dir() and any(directory.iterdir())
    r = api.delete(_ckpt_url(run["state"]), headers=KEY)
    assert r.status_code == 200
    assert not directory.exists() and api.st.store.checkpoint(run["state"]) is None
    assert api.delete(_ckpt_url(run["state"]), headers=KEY).status_code == 404
    tr = _get(api, f"/api/v1/training_runs/{run['model_id']}", cast=types.TrainingRun)
    assert tr.last_checkpoint is None and tr.last_sampler_checkpoint is not None


def test_ttl(api, run):
    st = api.st
    r = api.put(_ckpt_url(run["snap"], "/ttl"), headers=KEY, json={"ttl_seconds": 7200})
    assert r.status_code == 200
    listed = _get(api, "/api/v1/checkpoints", cast=types.CheckpointsListResponse).checkpoints
    expires = {c.tinker_path: c.expires_at for c in listed}
    assert expires[run["state"]] is None and 7100 < expires[run["snap"]].timestamp() - listed[0].time.timestamp() < 7300
    assert api.put(_ckpt_url(run["snap"], "/ttl"), headers=KEY, json={"ttl_seconds": None}).status_code == 200
    assert st.store.checkpoint(run["snap"])["expires_at"] is None
    for bad in (0, -5, 10**10):
        r = api.put(_ckpt_url(run["snap"], "/ttl"), headers=KEY, json={"ttl_seconds": bad})
        assert r.status_code == 400 and "ttl_seconds" in r.json()["detail"]

    # Expired: not found when read, removed (row and files) when anything is listed.
    directory = Path(st.store.checkpoint(run["snap"])["directory"])
    st.store.set_checkpoint_ttl(run["snap"], -1)
    with pytest.raises(NotFound):
        readable_checkpoint(st, _owner_of(KEY), run["snap"])
    assert api.post("/api/v1/weights_info", headers=KEY, json={"tinker_path": run["snap"]}).status_code == 404
    assert api.post(_ckpt_url(run["snap"], "/publish"), headers=KEY).status_code == 404
    assert directory.exists()
    listed = _get(api, f"/api/v1/training_runs/{run['model_id']}/checkpoints")["checkpoints"]
    assert [c["tinker_path"] for c in listed] == [run["state"]]
    assert not directory.exists() and st.store.checkpoint(run["snap"]) is None

    st.store.set_checkpoint_ttl(run["state"], -1)
    assert purge_expired(st) == 1 and purge_expired(st) == 0
    assert _get(api, "/api/v1/checkpoints")["checkpoints"] == []


def test_bad_requests_name_the_field(api, run):
    for url in ("/api/v1/training_runs", "/api/v1/checkpoints", "/api/v1/sessions"):
        for limit in (0, 1001):
            r = api.get(url, headers=KEY, params={"limit": limit})
            assert r.status_code == 400 and "limit" in r.json()["detail"], url
        r = api.get(url, headers=KEY, params={"offset": -1})
        assert r.status_code == 400 and "offset" in r.json()["detail"]
    r = api.get("/api/v1/training_runs", headers=KEY, params={"access_scope": "everyone"})
    assert r.status_code == 400 and "access_scope" in r.json()["detail"]
    r = api.post("/api/v1/weights_info", headers=KEY, json={"tinker_path": "s3://nope"})
    assert r.status_code == 400 and "tinker_path" in r.json()["detail"]
    r = api.delete(f"/api/v1/training_runs/{run['model_id']}/checkpoints/bogus/x", headers=KEY)
    assert r.status_code == 400 and "checkpoint_id" in r.json()["detail"]
    assert api.get("/api/v1/training_runs", headers={"X-API-Key": "sk-nope"}).status_code == 401


def test_a_checkpoint_named_publish_is_still_deletable(api, run):
    fut = api.post("/api/v1/save_weights", headers=KEY, json={"model_id": run["model_id"], "path": "publish",
                                                              "seq_id": 4}).json()
    assert "error" not in future_result(api, fut["request_id"])
    path = f"tinker://{run['model_id']}/weights/publish"
    assert api.delete(_ckpt_url(path), headers=KEY).status_code == 200
    assert api.st.store.checkpoint(path) is None


def test_old_databases_get_the_new_columns(tmp_path):
    db = tmp_path / "old.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE checkpoints (path TEXT PRIMARY KEY, model_id TEXT NOT NULL, owner TEXT NOT NULL, "
                     "kind TEXT NOT NULL, name TEXT NOT NULL, directory TEXT NOT NULL, base_model TEXT NOT NULL, "
                     "created REAL NOT NULL)")
        conn.execute("INSERT INTO checkpoints VALUES ('tinker://m/weights/a', 'm', 'o', 'weights', 'a', '/x', 'b', 1)")
    store = Store(SQLite(db))
    row = store.checkpoint("tinker://m/weights/a")
    assert (row["public"], row["expires_at"], row["user_metadata"]) == (0, None, None)
    store.set_checkpoint_public("tinker://m/weights/a", True)
    assert store.checkpoint("tinker://m/weights/a")["public"] == 1
    store.close()
    Store(SQLite(db)).close()  # a second open finds nothing to add
