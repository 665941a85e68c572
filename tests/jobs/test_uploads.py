"""Uploaded files and the jobs made from them, through the HTTP API on the in-process app (tiny model, no job
runner: jobs stay queued): the files routes in OpenAI's shape (and through the official `openai` client against a
live server), per-key visibility, the size limit and quota leaving nothing behind, `data_file` / `training_file`,
a multipart job (`curl -F file=@chats.jsonl -F kind=sft`), and the same line-and-field errors on every path."""

from __future__ import annotations

import json

import openai
import pytest

from tests.app_client import app_client
from tests.inprocess_server import inprocess_server
from tests.jobs.files import RL_GRADER, jsonl, rl_rows, sft_rows
from tinkerd.control.jobs.uploads import Uploads

ALICE, BOB = {"X-API-Key": "tml-alice"}, {"X-API-Key": "tml-bob"}
LIMIT, QUOTA = 10_000, 20_000  # bytes: a 45-row sft file is ~8 kB
SFT = jsonl(sft_rows(45))


@pytest.fixture
def client(tmp_path):
    yield from app_client(tmp_path, job_max_file_bytes=LIMIT, file_quota_bytes=QUOTA)


def upload(client, text: str | bytes = SFT, headers=ALICE, name="chats.jsonl", **fields):
    return client.post("/api/v1/files", files={"file": (name, text)}, data=fields, headers=headers)


def stored(tmp_path) -> list[str]:
    folder = tmp_path / "files"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_upload_list_read_and_delete_in_openais_shape_each_key_its_own(client, tmp_path):
    made = upload(client).json()
    assert made["id"].startswith("file-") and made["object"] == "file" and made["bytes"] == len(SFT.encode())
    assert (made["filename"], made["purpose"], made["status"]) == ("chats.jsonl", "fine-tune", "processed")
    assert isinstance(made["created_at"], int) and stored(tmp_path) == [made["id"]]
    second = upload(client, jsonl(rl_rows()), name="prompts.jsonl", purpose="user_data").json()
    listed = client.get("/api/v1/files", headers=ALICE).json()
    assert listed["object"] == "list" and listed["has_more"] is False
    assert [f["id"] for f in listed["data"]] == [second["id"], made["id"]]  # newest first
    page = client.get("/api/v1/files", params={"limit": 1, "order": "asc"}, headers=ALICE).json()
    assert [f["id"] for f in page["data"]] == [made["id"]] and page["has_more"] is True
    rest = client.get("/api/v1/files", params={"limit": 1, "order": "asc", "after": made["id"]}, headers=ALICE).json()
    assert [f["id"] for f in rest["data"]] == [second["id"]] and rest["has_more"] is False
    assert [f["id"] for f in client.get("/api/v1/files?purpose=user_data", headers=ALICE).json()["data"]] == [
        second["id"]]
    bearer = {"Authorization": "Bearer tml-alice"}  # OpenAI clients' header names the same caller
    assert client.get(f"/api/v1/files/{made['id']}", headers=bearer).json() == made
    assert client.get(f"/api/v1/files/{made['id']}/content", headers=ALICE).text == SFT

    assert client.get("/api/v1/files", headers=BOB).json()["data"] == []
    for method, url in (("GET", f"/api/v1/files/{made['id']}"), ("GET", f"/api/v1/files/{made['id']}/content"),
                        ("DELETE", f"/api/v1/files/{made['id']}")):
        reply = client.request(method, url, headers=BOB)
        assert reply.status_code == 404 and made["id"] in reply.json()["detail"], url
    assert client.delete(f"/api/v1/files/{made['id']}", headers=ALICE).json() == {
        "id": made["id"], "object": "file", "deleted": True}
    assert client.get(f"/api/v1/files/{made['id']}", headers=ALICE).status_code == 404
    assert stored(tmp_path) == [second["id"]]


def test_a_file_over_the_limit_or_the_quota_is_413_naming_file_and_leaves_nothing(client, tmp_path):
    big = "x" * (LIMIT + 1)
    reply = upload(client, big)
    assert reply.status_code == 413 and reply.json()["detail"].startswith("file: more than this server's limit")
    huge = client.post("/api/v1/files", files={"file": ("huge.jsonl", "y" * (LIMIT + 100_000))}, headers=ALICE)
    assert huge.status_code == 413 and huge.json()["detail"].startswith("file:")  # refused by its Content-Length
    assert stored(tmp_path) == [] and client.get("/api/v1/files", headers=ALICE).json()["data"] == []

    first, second = upload(client).json(), upload(client).json()  # 2 x ~8 kB of the 20 kB quota
    over = upload(client)
    assert over.status_code == 413 and "quota of 20000 bytes" in over.json()["detail"]
    assert over.json()["detail"].startswith("file:") and stored(tmp_path) == sorted([first["id"], second["id"]])
    assert upload(client, headers=BOB).status_code == 200  # a quota per key
    client.delete(f"/api/v1/files/{first['id']}", headers=ALICE)
    assert upload(client).status_code == 200


def test_a_restart_removes_what_a_crash_left_half_written(client, tmp_path):
    kept = upload(client).json()["id"]
    (tmp_path / "files" / "file-0123.part").write_bytes(b"half an upload")  # killed while copying
    (tmp_path / "files" / "file-4567").write_bytes(b"renamed, row never written")  # killed between the two
    Uploads(client.st.store, tmp_path / "files", LIMIT)
    assert stored(tmp_path) == [kept]


def test_bad_uploads_are_400s_naming_the_field(client, tmp_path):
    for reply, field in ((upload(client, b"\xff\xfe not utf-8"), "file: not UTF-8 text (byte 0)"),
                         (upload(client, b""), "file: empty"),
                         (upload(client, purpose="batch"), "purpose: 'batch' is not used here"),
                         (client.post("/api/v1/files", data={"purpose": "fine-tune"}, headers=ALICE,
                                      files={"other": ("x.jsonl", "{}")}), "other: a file part"),
                         (client.post("/api/v1/files", json={"file": SFT}, headers=ALICE), "file: send the file as "),
                         (client.get("/api/v1/files?after=file-nope", headers=ALICE), "after: file 'file-nope'")):
        assert reply.status_code == 400 and reply.json()["detail"].startswith(field), reply.text
    missing = client.post("/api/v1/files", files={"purpose": (None, "fine-tune")}, headers=ALICE)
    assert missing.status_code == 400 and missing.json()["detail"].startswith("file: missing")
    assert client.post("/api/v1/files", files={"file": ("x", SFT)}).status_code == 401  # no key
    assert stored(tmp_path) == []


def job(client, headers=ALICE, **fields):
    return client.post("/api/v1/jobs", json={"kind": "sft", "budget": "3 steps", **fields}, headers=headers)


def test_a_job_from_an_uploaded_file_and_by_openais_name(client, tmp_path):
    file_id = upload(client).json()["id"]
    made = job(client, data_file=file_id).json()
    assert made["status"] == "queued" and made["rows"] == 45 and made["data_file"] == file_id
    assert (tmp_path / "jobs" / made["id"] / "data.jsonl").read_text() == SFT
    alias = job(client, training_file=file_id).json()
    assert alias["rows"] == 45 and alias["data_file"] == file_id
    client.delete(f"/api/v1/files/{file_id}", headers=ALICE)  # the job keeps its own copy
    assert (tmp_path / "jobs" / made["id"] / "data.jsonl").read_text() == SFT
    assert job(client, data=SFT).json()["data_file"] is None  # inline data, as before


def test_a_jobs_data_is_one_of_data_or_data_file_and_a_file_id_must_be_the_callers(client):
    mine = upload(client).json()["id"]
    bobs = upload(client, headers=BOB).json()["id"]
    cases = [(job(client, data=SFT, data_file=mine), 400, "data, data_file: both given"),
             (job(client), 400, "data, data_file: neither given"),
             (job(client, data_file=mine, training_file=mine), 400, "data_file, training_file: both given"),
             (job(client, data=SFT, training_file=mine), 400, "data, training_file: both given"),
             (job(client, data_file="file-nope"), 404, "data_file: file 'file-nope' not found"),
             (job(client, training_file=bobs), 404, f"training_file: file '{bobs}' not found"),
             (job(client, data_file=7), 400, "data_file: expected a file id"),
             (job(client, data=SFT, base_model=5), 422, "base_model: Input should be a valid string"),
             (client.post("/api/v1/jobs", content=b"{not json", headers={**ALICE, "Content-Type": "application/json"}),
              400, "body: not valid JSON")]
    for reply, status, detail in cases:
        assert reply.status_code == status and reply.json()["detail"].startswith(detail), reply.text
    assert client.get("/api/v1/jobs", headers=ALICE).json()["total"] == 0


def test_a_bad_line_in_an_uploaded_file_is_reported_with_its_number_and_field(client, tmp_path):
    lines = SFT.splitlines()
    lines[11] = '{"prompt": "Where is Quillmark?", "completion": 7}'
    file_id = upload(client, "\n".join(lines)).json()["id"]
    reply = job(client, data_file=file_id)
    assert reply.status_code == 400
    assert reply.json()["detail"] == "line 12, field 'completion': expected a non-empty string, got int 7"
    rl_file = upload(client, jsonl(rl_rows()[:30]), name="few.jsonl").json()["id"]
    few = job(client, kind="rl", grader=RL_GRADER, data_file=rl_file)
    assert few.status_code == 400 and few.json()["detail"].startswith("the file has 30 rows; a job needs at least 40")
    assert client.get("/api/v1/jobs", headers=ALICE).json()["total"] == 0
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())


def form_job(client, text=SFT, headers=ALICE, **fields):
    fields = {"kind": "sft", "budget": "3 steps", **fields}
    return client.post("/api/v1/jobs", data=fields, files={"file": ("chats.jsonl", text)}, headers=headers)


def test_a_multipart_job_as_curl_sends_it(client, tmp_path):
    made = form_job(client, hyperparameters='{"rank": 8, "batch_size": 4}').json()
    assert made["rows"] == 45 and made["hyperparameters"] == {"rank": 8, "batch_size": 4}
    assert made["budget"] == {"minutes": None, "steps": 3} and made["data_file"] is None
    assert (tmp_path / "jobs" / made["id"] / "data.jsonl").read_text() == SFT
    rl = form_job(client, jsonl(rl_rows()), kind="rl", grader=json.dumps(RL_GRADER), budget="2m").json()
    assert rl["grader"] == {**RL_GRADER, "field": "answer"} and rl["budget"]["minutes"] == 2.0
    by_name = form_job(client, jsonl([{**r, "answer": "Paris"} for r in rl_rows()]), kind="rl", grader="contains")
    assert by_name.json()["grader"] == {"type": "contains", "field": "answer"}
    file_id = upload(client).json()["id"]
    ref = client.post("/api/v1/jobs", files={"kind": (None, "sft"), "training_file": (None, file_id)}, headers=ALICE)
    assert ref.json()["data_file"] == file_id  # a form may reference an upload too


def test_multipart_jobs_refuse_bad_fields_by_name(client, tmp_path):
    lines = SFT.splitlines()
    lines[3] = "{not json"
    cases = [(form_job(client, "\n".join(lines)), 400, "line 4: not valid JSON"),
             (form_job(client, hyperparameters="{rank: 8}"), 400, "hyperparameters: not valid JSON"),
             (form_job(client, hyperparameters='{"rnak": 8}'), 400, "hyperparameters.rnak: unknown"),
             (form_job(client, grader="exact_match"), 400, "grader: only rl jobs take a grader"),
             (form_job(client, data="{}"), 400, "data: not a field of a job form"),
             (form_job(client, kind="ppo"), 400, "kind: unknown kind 'ppo'"),
             (form_job(client, "x" * (LIMIT + 1)), 413, "file: more than this server's limit"),
             (form_job(client, b"\xc3("), 400, "file: not UTF-8 text (byte 0)"),
             (form_job(client, data_file="file-abc"), 400, "file, data_file: both given"),
             (client.post("/api/v1/jobs", files={"kind": (None, "sft")}, headers=ALICE), 400,
              "file, data_file: neither given")]
    for reply, status, detail in cases:
        assert reply.status_code == status and reply.json()["detail"].startswith(detail), reply.text
    assert client.get("/api/v1/jobs", headers=ALICE).json()["total"] == 0


def test_tune_sends_its_file_as_a_multipart_job(client, tmp_path):
    from tinkerd.cli import _parser
    from tinkerd.jobs.tune import submit

    data = tmp_path / "prompts.jsonl"
    data.write_text(jsonl(rl_rows()))
    args = _parser().parse_args(["tune", str(data), "--kind", "rl", "--grader", "regex", "--pattern", "^ok$",
                                 "--budget", "40 steps", "--set", "group_size=8"])
    client.headers.update(ALICE)
    made = submit(client, args).json()
    assert made["rows"] == 40 and made["grader"]["pattern"] == "^ok$" and made["hyperparameters"] == {"group_size": 8}
    assert (tmp_path / "jobs" / made["id"] / "data.jsonl").read_text() == data.read_text()


def test_the_official_openai_client_uploads_lists_and_deletes(tmp_path):
    with inprocess_server(tmp_path) as (url, _):
        alice = openai.OpenAI(base_url=f"{url}/api/v1", api_key="tml-alice", max_retries=0)
        path = tmp_path / "chats.jsonl"
        path.write_text(SFT)
        made = [alice.files.create(file=path.open("rb"), purpose="fine-tune") for _ in range(3)]
        assert made[0].bytes == len(SFT.encode()) and made[0].filename == "chats.jsonl"
        assert [f.id for f in alice.files.list(limit=2)] == [f.id for f in reversed(made)]  # pages on has_more
        assert alice.files.retrieve(made[1].id).id == made[1].id
        assert alice.files.content(made[1].id).read() == SFT.encode()
        bob = openai.OpenAI(base_url=f"{url}/api/v1", api_key="tml-bob", max_retries=0)
        assert list(bob.files.list()) == []
        with pytest.raises(openai.NotFoundError):
            bob.files.retrieve(made[0].id)
        assert alice.files.delete(made[0].id).deleted is True
        assert [f.id for f in alice.files.list()] == [made[2].id, made[1].id]
        with pytest.raises(openai.BadRequestError, match="purpose: 'batch' is not used here") as refused:
            alice.files.create(file=path.open("rb"), purpose="batch")  # the message in OpenAI's error shape too
        assert refused.value.param == "purpose"
