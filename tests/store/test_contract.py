"""The Store's contract, run on SQLite and on PostgreSQL (`store_url` is parametrized in conftest)."""

from __future__ import annotations

import contextlib
import time

import pytest

from tinkerd.store import db as store_db
from tinkerd.store.db import open_store


@contextlib.contextmanager
def frozen_clock(at: float):
    """Every row written inside gets `created` (and friends) = `at`: ties are broken by insertion order."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store_db.time, "time", lambda: at)
        yield


def _ids(rows):
    return [r["id"] for r in rows]


def test_sessions(store):
    store.add_session("s1", "alice", "0.38.0", ["a", "b"], {"k": "v"})
    row = store.session("s1")
    assert (row["id"], row["owner"], row["sdk_version"], row["finished"]) == ("s1", "alice", "0.38.0", 0)
    assert row["tags"] == ["a", "b"] and row["user_metadata"] == {"k": "v"}
    assert row["created"] == row["last_seen"] and "rowid" not in row
    assert store.session("nope") is None

    time.sleep(0.01)
    store.touch_session("s1")
    assert store.session("s1")["last_seen"] > row["last_seen"]
    store.finish_session("s1")
    assert store.session("s1")["finished"] == 1

    store.add_session("s2", "alice", None, [], {})
    store.add_session("s3", "bob", None, [], {})
    assert store.session("s2")["sdk_version"] is None and store.session("s2")["tags"] == []
    rows, total = store.list_sessions("alice", limit=1, offset=0)
    assert _ids(rows) == ["s2"] and total == 2
    rows, total = store.list_sessions("alice", limit=10, offset=1)
    assert _ids(rows) == ["s1"] and total == 2
    assert store.list_sessions("carol", 10, 0) == ([], 0)


def test_models_and_sampling_sessions(store):
    store.add_session("s", "alice", None, [], {})
    lora = {"rank": 4, "seed": 1, "train_unembed": False}
    store.add_model("s:train:0", "s", "alice", "tiny", lora, {"step": "3"})
    store.add_model("s:train:1", "s", "alice", "tiny", lora, None)
    store.add_model("other:train:0", "o", "bob", "tiny", lora, None)
    m = store.model("s:train:0")
    assert (m["session_id"], m["owner"], m["base_model"]) == ("s", "alice", "tiny")
    assert m["lora_config"] == lora and m["user_metadata"] == {"step": "3"}
    assert store.model("s:train:1")["user_metadata"] is None and store.model("nope") is None
    assert store.session_model_ids("s") == ["s:train:0", "s:train:1"]

    rows, total = store.list_models("alice", 10, 0)
    assert _ids(rows) == ["s:train:1", "s:train:0"] and total == 2
    assert store.list_models("alice", 10, 0, with_public=True)[1] == 2
    store.add_checkpoint("tinker://other:train:0/weights/w", "other:train:0", "bob", "weights", "w", "/d", "tiny")
    store.set_checkpoint_public("tinker://other:train:0/weights/w", True)
    rows, total = store.list_models("alice", 10, 0, with_public=True)
    assert set(_ids(rows)) == {"s:train:0", "s:train:1", "other:train:0"} and total == 3
    assert _ids(store.all_models()) == ["s:train:0", "s:train:1", "other:train:0"]

    store.add_sampling_session("s:sample:0", "s", "alice", "tiny", "tinker://x/sampler_weights/a", None)
    store.add_sampling_session("s:sample:1", "s", "alice", "tiny", None, "file:///adapter")
    assert store.sampling_session("s:sample:1")["adapter_uri"] == "file:///adapter"
    store.add_sampling_session("s:sample:0", "s", "alice", "tiny", None, "file:///other")  # re-added: replaced, newer
    row = store.sampling_session("s:sample:0")
    assert (row["model_path"], row["adapter_uri"]) == (None, "file:///other")
    assert store.session_sampler_ids("s") == ["s:sample:1", "s:sample:0"] and store.session_sampler_ids("x") == []
    assert store.sampling_session("nope") is None


def test_futures(store):
    assert store.model_last_request("m") is None
    store.add_future("f1", "alice", "forward_backward", "m", 1)
    store.add_future("f2", "alice", "forward_backward", "m", 2)
    store.add_future("f3", "alice", "sample")
    big = 2**40  # seq ids are 64-bit on both databases
    store.add_future("f4", "alice", "forward_backward", "m", big)
    row = store.future("f1")
    assert (row["state"], row["kind"], row["model_id"], row["seq_id"], row["finished"]) == (
        "pending", "forward_backward", "m", 1, None)
    assert store.future("f3")["seq_id"] is None and store.future("nope") is None
    assert store.future_for_seq("m", 2)["id"] == "f2" and store.future_for_seq("m", big)["id"] == "f4"
    assert store.future_for_seq("m", 3) is None
    assert store.model_last_request("m") == store.future("f4")["created"]

    payload = bytes(range(256)) * 4
    store.complete_future("f1", {"loss": 0.5, "nested": [1, {"a": None}]}, payload)
    row = store.future("f1")
    assert row["state"] == "done" and row["result_json"] == {"loss": 0.5, "nested": [1, {"a": None}]}
    assert row["result_pb"] == payload and isinstance(row["result_pb"], bytes) and row["finished"] >= row["created"]
    store.complete_future("f3")
    assert store.future("f3")["result_json"] is None and store.future("f3")["result_pb"] is None
    store.fail_future("f2", "bad input", "user")
    row = store.future("f2")
    assert (row["state"], row["error"], row["category"]) == ("error", "bad input", "user")


def test_a_seq_id_is_unique_per_model(store):
    store.add_future("f1", "alice", "forward_backward", "m", 1)
    with pytest.raises(Exception) as raised:
        store.add_future("f2", "alice", "forward_backward", "m", 1)
    assert type(raised.value).__name__ in ("IntegrityError", "UniqueViolation")
    store.add_future("f3", "alice", "forward_backward", "other", 1)  # another model may reuse it
    store.add_future("f4", "alice", "sample", None, None)  # rows without model or seq id never clash
    store.add_future("f5", "alice", "sample", None, None)
    store.add_future("f6", "alice", "forward_backward", "m", None)
    store.add_future("f7", "alice", "forward_backward", "m", None)
    assert store.future("f2") is None and store.future_for_seq("m", 1)["id"] == "f1"
    with pytest.raises(Exception):
        store.add_future("f1", "alice", "sample")  # and a future id is unique
    assert store.future("f7")["state"] == "pending"  # the connection is still usable after the errors


def test_fail_unfinished_futures(store_url, tmp_path):
    store = open_store(store_url, tmp_path)
    store.add_future("done", "alice", "sample")
    store.complete_future("done", {"ok": True})
    store.add_future("failed", "alice", "sample")
    store.fail_future("failed", "boom", "user")
    store.add_future("p1", "alice", "forward_backward", "m", 1)
    store.add_future("p2", "bob", "sample")
    store.close()

    store = open_store(store_url, tmp_path)  # what the server does at start-up
    try:
        assert store.fail_unfinished_futures("the server restarted") == 2
        for fid in ("p1", "p2"):
            row = store.future(fid)
            assert (row["state"], row["error"], row["category"]) == ("error", "the server restarted", "server")
            assert row["finished"] is not None
        assert store.future("done")["state"] == "done" and store.future("done")["result_json"] == {"ok": True}
        assert store.future("failed")["error"] == "boom" and store.future("failed")["category"] == "user"
        assert store.fail_unfinished_futures("again") == 0
    finally:
        store.close()


def test_the_journal_keeps_requests_until_a_snapshot_covers_them(store_url, tmp_path):
    store = open_store(store_url, tmp_path)
    for seq in range(4):
        store.add_future(f"m{seq}", "alice", "optim_step", "m", seq, request=b'{"lr": %d}\n' % seq)
    store.add_future("n1", "alice", "optim_step", "n", 1, request=None)  # a server that keeps no journal
    store.add_future("s1", "alice", "sample", request=b"{}\n")
    store.complete_future("m0", {"ok": True})
    assert store.journaled_models() == ["m"]
    assert [(r["seq_id"], bytes(r["request"])) for r in store.journal("m", 1)] == [(2, b'{"lr": 2}\n'), (3, b'{"lr": 3}\n')]
    assert store.journal("m", -1)[0]["state"] == "done" and store.journal("m", -1)[1]["state"] == "pending"
    assert store.forget_journal("m", 2) == 3
    assert [r["request"] is None for r in store.journal("m", -1)] == [True, True, True, False]
    store.close()

    store = open_store(store_url, tmp_path)  # start-up: the replay answers m3; samples are lost, the rest fail
    try:
        assert store.fail_unfinished_futures("resend", kind="sample", state="lost") == 1
        assert store.fail_unfinished_futures("restarted", keep={"m3"}) == 3
        assert store.future("m3")["state"] == "pending" and store.future("s1")["state"] == "lost"
        assert store.future("m2")["error"] == "restarted" and store.future("s1")["error"] == "resend"
    finally:
        store.close()


def test_checkpoints(store):
    base = dict(owner="alice", kind="weights", directory="/ckpt", base_model="tiny")
    with frozen_clock(1_600_000_000.123456):  # created ties: newest-first means last inserted first
        store.add_checkpoint("tinker://m/weights/a", "m", name="a", user_metadata={"note": "first"}, **base)
        store.add_checkpoint("tinker://m/weights/b", "m", name="b", **base)
    store.add_checkpoint("tinker://n/sampler_weights/c", "n", owner="alice", kind="sampler_weights", name="c",
                         directory="/c", base_model="tiny")
    store.add_checkpoint("tinker://z/weights/d", "z", name="d", **{**base, "owner": "bob"})

    row = store.checkpoint("tinker://m/weights/a")
    assert row["created"] == 1_600_000_000.123456  # full double precision on both databases
    assert (row["model_id"], row["kind"], row["name"], row["directory"], row["base_model"]) == (
        "m", "weights", "a", "/ckpt", "tiny")
    assert (row["public"], row["expires_at"], row["user_metadata"]) == (0, None, {"note": "first"})
    assert store.checkpoint("tinker://m/weights/b")["user_metadata"] is None
    assert store.checkpoint("tinker://nope/weights/x") is None

    assert [r["name"] for r in store.model_checkpoints("m")] == ["b", "a"]
    rows, total = store.list_checkpoints("alice", 2, 0)
    assert [r["name"] for r in rows] == ["c", "b"] and total == 3
    rows, total = store.list_checkpoints("alice", 2, 2)
    assert [r["name"] for r in rows] == ["a"] and total == 3
    assert store.checkpoint_counts() == {"m": 2, "n": 1, "z": 1}
    assert [r["name"] for r in store.all_checkpoints()] == ["d", "c", "b", "a"]

    store.set_checkpoint_public("tinker://m/weights/a", True)
    assert store.checkpoint("tinker://m/weights/a")["public"] == 1
    store.set_checkpoint_public("tinker://m/weights/a", False)
    assert store.checkpoint("tinker://m/weights/a")["public"] == 0

    now = time.time()
    store.set_checkpoint_ttl("tinker://m/weights/a", 3600)
    store.set_checkpoint_ttl("tinker://m/weights/b", -1)
    assert now + 3600 <= store.checkpoint("tinker://m/weights/a")["expires_at"] <= time.time() + 3600
    assert [r["path"] for r in store.expired_checkpoints()] == ["tinker://m/weights/b"]
    assert {r["path"] for r in store.expired_checkpoints(now=now + 7200)} == {"tinker://m/weights/a",
                                                                              "tinker://m/weights/b"}
    store.set_checkpoint_ttl("tinker://m/weights/b", None)
    assert store.checkpoint("tinker://m/weights/b")["expires_at"] is None and store.expired_checkpoints() == []

    # overwriting a checkpoint replaces its row: private again, no TTL, the new metadata
    store.set_checkpoint_public("tinker://m/weights/a", True)
    store.add_checkpoint("tinker://m/weights/a", "m", name="a", user_metadata={"note": "second"},
                         **{**base, "directory": "/new"})
    row = store.checkpoint("tinker://m/weights/a")
    assert (row["public"], row["expires_at"], row["user_metadata"], row["directory"]) == (
        0, None, {"note": "second"}, "/new")
    assert store.checkpoint_counts()["m"] == 2 and [r["name"] for r in store.model_checkpoints("m")] == ["a", "b"]

    store.delete_checkpoint("tinker://m/weights/a")
    assert store.checkpoint("tinker://m/weights/a") is None and store.checkpoint_counts()["m"] == 1
    store.delete_checkpoint("tinker://m/weights/a")  # deleting twice is harmless


def test_jobs(store):
    with frozen_clock(100.0):
        store.add_job("j1", "alice", "sft", {"kind": "sft", "budget": {"steps": 3}})
        store.add_job("j2", "alice", "rl", {"kind": "rl"})
        store.add_job("j3", "bob", "dpo", {"kind": "dpo"})
    row = store.job("j1")
    assert (row["status"], row["job_spec"], row["job_progress"], row["token_hash"]) == (
        "queued", {"kind": "sft", "budget": {"steps": 3}}, None, None)
    store.update_job("j1", status="running", token_hash="h1", job_progress={"step": 2}, job_resume={"step": 2})
    assert store.job("j1")["job_progress"] == {"step": 2} and store.job_for_token("h1")["id"] == "j1"
    assert store.job_for_token("nope") is None
    assert _ids(store.jobs_in(("queued",))) == ["j2", "j3"]  # creation order, ties by insertion
    rows, total = store.list_jobs("alice", 10, 0)
    assert _ids(rows) == ["j2", "j1"] and total == 2  # newest first


def test_uploaded_files(store):
    with frozen_clock(100.0):
        store.add_file("file-a", "alice", "chats.jsonl", "fine-tune", 2**40)  # beyond int32: BIGINT on PostgreSQL
        store.add_file("file-b", "alice", "more.jsonl", "user_data", 5)
        store.add_file("file-c", "bob", "his.jsonl", "fine-tune", 7)
    row = store.file("file-a")
    assert (row["owner"], row["filename"], row["purpose"], row["size"], row["created"]) == (
        "alice", "chats.jsonl", "fine-tune", 2**40, 100.0) and "rowid" not in row
    assert _ids(store.list_files("alice")) == ["file-b", "file-a"]  # newest first, ties by insertion
    assert store.file_bytes("alice") == 2**40 + 5 and store.file_bytes("carol") == 0
    assert store.delete_file("file-a") is True and store.delete_file("file-a") is False
    assert store.file("file-a") is None and _ids(store.list_files("alice")) == ["file-b"]
    assert store.file_bytes("alice") == 5 and _ids(store.list_files("bob")) == ["file-c"]


def test_custom_losses_keep_their_first_definition(store):
    definition = {"name": "nll", "inputs": [{"name": "logprobs", "rank": 1}], "graph": {"format": 1, "nodes": []}}
    assert store.add_custom_loss("s1:loss:0", "s1", "alice", "nll", definition) is True
    assert store.add_custom_loss("s1:loss:0", "s1", "alice", "other", {"name": "other"}) is False  # a retry
    row = store.custom_loss("s1:loss:0")
    assert (row["session_id"], row["owner"], row["name"], row["definition"]) == ("s1", "alice", "nll", definition)
    assert store.custom_loss("s1:loss:1") is None


def test_rows_survive_a_reopen(store_url, tmp_path):
    store = open_store(store_url, tmp_path)
    store.add_session("s", "alice", "0.38.0", ["t"], {"k": 1})
    store.add_model("s:train:0", "s", "alice", "tiny", {"rank": 8}, None)
    store.add_sampling_session("s:sample:0", "s", "alice", "tiny", None, None)
    store.add_future("f", "alice", "save_weights", "s:train:0", 1)
    store.complete_future("f", {"path": "tinker://s:train:0/weights/w"}, b"\x00\x01pb")
    store.add_checkpoint("tinker://s:train:0/weights/w", "s:train:0", "alice", "weights", "w", "/d", "tiny",
                         {"step": 7})
    store.set_checkpoint_public("tinker://s:train:0/weights/w", True)
    store.set_checkpoint_ttl("tinker://s:train:0/weights/w", 60)
    before = {"session": store.session("s"), "model": store.model("s:train:0"),
              "sampler": store.sampling_session("s:sample:0"), "future": store.future("f"),
              "checkpoint": store.checkpoint("tinker://s:train:0/weights/w")}
    store.close()

    again = open_store(store_url, tmp_path)
    try:
        after = {"session": again.session("s"), "model": again.model("s:train:0"),
                 "sampler": again.sampling_session("s:sample:0"), "future": again.future("f"),
                 "checkpoint": again.checkpoint("tinker://s:train:0/weights/w")}
        assert after == before
        assert after["future"]["result_pb"] == b"\x00\x01pb" and after["checkpoint"]["public"] == 1
        assert again.list_checkpoints("alice", 10, 0)[1] == 1 and _ids(again.all_models()) == ["s:train:0"]
    finally:
        again.close()


def test_a_store_without_a_later_column_gets_it_on_open(store_url, tmp_path):
    store = open_store(store_url, tmp_path)
    store.add_checkpoint("tinker://m/weights/a", "m", "alice", "weights", "a", "/d", "tiny", {"x": 1})
    store._execute("ALTER TABLE checkpoints DROP COLUMN user_metadata")  # as a database from before the column
    store.close()

    store = open_store(store_url, tmp_path)
    try:
        assert store.checkpoint("tinker://m/weights/a")["user_metadata"] is None
        store.add_checkpoint("tinker://m/weights/b", "m", "alice", "weights", "b", "/d", "tiny", {"y": 2})
        assert store.checkpoint("tinker://m/weights/b")["user_metadata"] == {"y": 2}
    finally:
        store.close()
    open_store(store_url, tmp_path).close()  # a second open finds nothing to add


def test_a_dropped_postgres_connection_recovers(pg_url, pg_cluster, tmp_path):
    store = open_store(pg_url, tmp_path)
    try:
        store.add_session("s", "alice", None, [], {})
        pg_cluster.admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE datname = %s AND pid <> pg_backend_pid()", (pg_url.rsplit("/", 1)[1],))
        with pytest.raises(Exception):
            store.session("s")  # the statement that finds the connection gone fails
        assert store.session("s")["owner"] == "alice"  # the next one reconnects
    finally:
        store.close()


def test_steps_keep_each_runs_measurements_in_order_once_per_seq_id(store_url, tmp_path):
    store = open_store(store_url, tmp_path)
    store.add_step("alice", "s", "s:train:0", 1, "forward_backward", {"loss:sum": 3.5, "tokens": 12})
    store.add_step("alice", "s", "s:train:0", 2, "optim_step", {"learning_rate": 1e-3, "seconds": 0.2})
    store.add_step("alice", "s", "s:train:0", 1, "forward_backward", {"loss:sum": 99.0})  # a replay: kept once
    store.add_step("alice", "s", "s:train:1", 1, "forward_backward", {"loss:sum": 7.0})  # another run, same seq_id
    store.add_step("alice", "s", None, None, "sample", {"tokens": 5})
    store.add_step("alice", "s", "s:train:0", None, "sample", {"tokens": 6})  # no seq_id: never clashes
    store.add_step("alice", "s", "s:train:0", None, "sample", {"tokens": 6})
    rows = store.run_steps("s:train:0")
    assert [(r["kind"], r["seq_id"]) for r in rows] == [("forward_backward", 1), ("optim_step", 2), ("sample", None),
                                                         ("sample", None)]
    assert rows[0]["metrics"] == {"loss:sum": 3.5, "tokens": 12}
    assert [r["seq_id"] for r in store.run_steps("s:train:0", after=rows[1]["cursor"])] == [None, None]
    assert [r["kind"] for r in store.session_steps("s", since=0)].count("sample") == 3
    assert store.session_steps("s", since=time.time() + 60) == []
    store.close()
    reopened = open_store(store_url, tmp_path)
    assert len(reopened.run_steps("s:train:0")) == 4  # curves survive a restart
