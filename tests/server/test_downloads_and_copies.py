"""Export routes in-process on a tiny random model: save_weights_external, download links (no API key),
the pre-0.36 archive route, and copy_weights, with the cross-key rules."""

import io
import json
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file
from tinker import types

from tinkerd.control.downloads import URL_TTL_SECONDS
from tests.app_client import future_result

KEY = {"X-API-Key": "tml-owner"}
OTHER = {"X-API-Key": "tml-someone-else"}




def _new_model(api, headers=KEY):
    session = api.post("/api/v1/create_session", headers=headers, json={"tags": []}).json()["session_id"]
    fut = api.post("/api/v1/create_model", headers=headers, json={
        "session_id": session, "model_seq_id": 0, "base_model": "tiny", "lora_config": {"rank": 4, "seed": 1},
        "user_metadata": {"renderer_name": "qwen3_instruct"}}).json()
    model_id = future_result(api, fut["request_id"], headers)["model_id"]
    # Non-zero B so the exported adapter is not the (trivial) initial one.
    for name, p in api.st.trainer.runtimes["tiny"].lora.named_parameters(model_id):
        if name.endswith("lora_B"):
            p.data.normal_(std=0.1)
    return session, model_id


@pytest.fixture
def exported(api):
    session, model_id = _new_model(api)
    fut = api.post("/api/v1/save_weights_external", headers=KEY,
                   json={"model_id": model_id, "path": "hf", "seq_id": 1, "type": "save_weights_external"}).json()
    result = future_result(api, fut["request_id"])
    return {"session": session, "model_id": model_id, "result": result, "path": f"tinker://{model_id}/external_weights/hf"}


def _ckpt_url(path: str, suffix: str) -> str:
    parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(path)
    return f"/api/v1/training_runs/{parsed.training_run_id}/checkpoints/{parsed.checkpoint_id}{suffix}"


def _urls(api, path, headers=KEY):
    r = api.get(_ckpt_url(path, "/external_weights_urls"), headers=headers)
    assert r.status_code == 200, r.text
    return types.ExternalWeightsUrlsResponse.model_validate(r.json())


def _fetch(api, url, **kwargs):
    """GET an absolute URL through the TestClient, with no API key."""
    assert url.startswith(str(api.base_url))
    return api.get(url[len(str(api.base_url)):], **kwargs)


def test_save_external_then_download_every_file_without_a_key(api, exported):
    result = types.SaveWeightsExternalResponseInternal.model_validate(exported["result"])
    assert result.path == exported["path"]
    row = api.st.store.checkpoint(exported["path"])
    assert row["kind"] == "external_weights" and row["owner"] != ""
    listed = api.get(f"/api/v1/training_runs/{exported['model_id']}/checkpoints", headers=KEY).json()["checkpoints"]
    assert [c["checkpoint_id"] for c in listed] == ["external_weights/hf"]
    assert listed[0]["checkpoint_type"] == "external"

    urls = _urls(api, exported["path"])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(urls.urls)
    remaining = urls.expires.timestamp() - time.time()
    assert URL_TTL_SECONDS - 60 < remaining <= URL_TTL_SECONDS
    downloaded = {}
    for rel, url in urls.urls.items():
        r = _fetch(api, url)
        assert r.status_code == 200, (rel, r.text)
        downloaded[rel] = r.content
    assert result.size_bytes == sum(len(b) for b in downloaded.values())

    config = json.loads(downloaded["adapter_config.json"])
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 32)
    tensors = load(downloaded["adapter_model.safetensors"])
    exported_now = api.st.trainer.runtimes["tiny"].lora.export(exported["model_id"])
    assert tensors.keys() == exported_now.keys() and len(tensors) > 0
    for name, value in tensors.items():
        torch.testing.assert_close(value, exported_now[name], atol=0, rtol=0)
    assert any(v.abs().max() > 0 for k, v in tensors.items() if k.endswith("lora_B.weight"))


def test_download_links_refuse_traversal_and_unknown_or_dead_tokens(api, exported):
    urls = _urls(api, exported["path"]).urls
    one = urls["adapter_config.json"]
    base = one[: -len("adapter_config.json")]
    for evil in ("..%2F..%2F..%2F..%2Fsecret.txt", "%2e%2e/%2e%2e/%2e%2e/%2e%2e/secret.txt", "..%2Fhf%2Fadapter_config.json",
                 "%2Fetc%2Fpasswd"):
        r = _fetch(api, base + evil)  # the route sees the decoded "../.." and refuses it
        assert r.status_code == 404 and "is not a file of this download" in r.json()["detail"], evil
    token = one.split("/api/v1/downloads/")[1].split("/")[0]
    r = api.get(f"/api/v1/downloads/{'x' * len(token)}/adapter_config.json")
    assert r.status_code == 404 and "expired" in r.json()["detail"]

    grants = api.app.state.download_grants._grants  # expire the link
    grants[token] = grants[token].__class__(grants[token].checkpoint_path, grants[token].files, 0.0)
    r = _fetch(api, one)
    assert r.status_code == 404 and r.json()["detail"]

    fresh = _urls(api, exported["path"]).urls["adapter_config.json"]
    assert _fetch(api, fresh).status_code == 200
    api.delete(_ckpt_url(exported["path"], ""), headers=KEY)  # deleting the checkpoint kills its links
    r = _fetch(api, fresh)
    assert r.status_code == 404 and r.json()["detail"]


def test_other_keys_get_urls_only_of_published_checkpoints(api, exported):
    r = api.get(_ckpt_url(exported["path"], "/external_weights_urls"), headers=OTHER)
    assert r.status_code == 404 and r.json()["detail"]
    assert api.get(_ckpt_url(exported["path"], "/archive"), headers=OTHER).status_code == 404
    assert api.post(_ckpt_url(exported["path"], "/publish"), headers=KEY).status_code == 200
    assert set(_urls(api, exported["path"], OTHER).urls) >= {"adapter_config.json"}
    assert api.get(_ckpt_url(exported["path"], "/external_weights_urls")).status_code == 401  # a key is needed here


def test_save_external_errors(api):
    _, model_id = _new_model(api)
    r = api.post("/api/v1/save_weights_external", headers=KEY,
                 json={"model_id": model_id, "path": "enc", "seq_id": 1, "age_encryption_recipients": ["age1xyz"]})
    assert r.status_code == 400 and "age encryption is not supported" in r.json()["detail"]
    r = api.post("/api/v1/save_weights_external", headers=KEY, json={"model_id": model_id, "path": "../x", "seq_id": 2})
    assert r.status_code == 400 and "not a valid checkpoint name" in r.json()["detail"]
    r = api.post("/api/v1/save_weights_external", headers=OTHER, json={"model_id": model_id, "path": "x", "seq_id": 3})
    assert r.status_code == 404  # a stranger's request does not spend the owner's seq_id 3
    # With a TTL; the seq_id after the refused requests runs (each refused one used its seq_id, as the SDK counts).
    fut = api.post("/api/v1/save_weights_external", headers=KEY,
                   json={"model_id": model_id, "path": "short", "seq_id": 3, "ttl_seconds": 3600}).json()
    assert future_result(api, fut["request_id"])["path"].endswith("/external_weights/short")
    assert api.st.store.checkpoint(f"tinker://{model_id}/external_weights/short")["expires_at"] is not None


def test_archive_route_gives_a_tar_gz_of_the_checkpoint(api, exported):
    model_id = exported["model_id"]
    fut = api.post("/api/v1/save_weights", headers=KEY, json={"model_id": model_id, "path": "state", "seq_id": 2}).json()
    state_path = future_result(api, fut["request_id"])["path"]
    for path, expected in [(exported["path"], {"adapter_config.json", "adapter_model.safetensors"}),
                           (state_path, {"adapter_config.json", "optimizer.safetensors"})]:
        r = api.get(_ckpt_url(path, "/archive"), headers=KEY)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"url", "expires"} and body["url"].endswith(".tar.gz")
        download = _fetch(api, body["url"])
        assert download.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as tar:
            names = set(tar.getnames())
            assert expected <= names
            config = json.loads(tar.extractfile("adapter_config.json").read())
        assert config["r"] == 4
        again = api.get(_ckpt_url(path, "/archive"), headers=KEY).json()
        assert again["url"].rsplit("/", 1)[1] == body["url"].rsplit("/", 1)[1]  # built once, reused
    assert api.get(_ckpt_url(exported["path"], "/archive").replace("external_weights", "bogus"),
                   headers=KEY).status_code == 400
    # The routes of rest.py on the same prefix still work.
    assert api.put(_ckpt_url(state_path, "/ttl"), headers=KEY, json={"ttl_seconds": 7200}).status_code == 200


def _copy(api, headers=KEY, idem=None, **body):
    extra = {"X-Idempotency-Key": idem} if idem else {}
    return api.post("/api/v1/copy_weights", headers={**headers, **extra}, json=body)


def test_copy_weights(api, exported):
    src = exported["path"]
    r = _copy(api, source_path=src, destination_project_id="proj", idem="k1")
    assert r.status_code == 200, r.text
    copy = types.CopyWeightsResponse.model_validate(r.json()).tinker_path
    assert copy.startswith(f"tinker://{exported['model_id']}/external_weights/hf-copy-")
    assert _copy(api, source_path=src, destination_project_id="proj", idem="k1").json()["tinker_path"] == copy
    src_row, copy_row = api.st.store.checkpoint(src), api.st.store.checkpoint(copy)
    assert copy_row["directory"] != src_row["directory"]
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (Path(copy_row["directory"]) / f).read_bytes() == (Path(src_row["directory"]) / f).read_bytes()
    source_tensors = load_file(str(Path(src_row["directory"]) / "adapter_model.safetensors"))
    # The copy outlives its source and is a checkpoint like any other (readable, downloadable).
    api.delete(_ckpt_url(src, ""), headers=KEY)
    downloaded = load(_fetch(api, _urls(api, copy).urls["adapter_model.safetensors"]).content)
    assert downloaded.keys() == source_tensors.keys()
    assert all(torch.equal(downloaded[k], source_tensors[k]) for k in downloaded)

    # Into a given model of the caller, keeping the name; with a TTL.
    session2, model2 = _new_model(api)
    into = _copy(api, source_path=copy, session_id=session2, model_seq_id=0, ttl_seconds=3600).json()["tinker_path"]
    assert into == f"tinker://{model2}/external_weights/{copy.rsplit('/', 1)[1]}"
    assert api.st.store.checkpoint(into)["expires_at"] is not None
    assert _copy(api, source_path=copy, session_id=session2, model_seq_id=5).status_code == 404
    assert _copy(api, source_path=copy, session_id=session2).status_code == 400
    assert _copy(api, source_path="tinker://nope").status_code == 400


def test_other_keys_cannot_copy_private_checkpoints_but_can_copy_published_ones(api, exported):
    src = exported["path"]
    r = _copy(api, OTHER, source_path=src, destination_project_id="p")
    assert r.status_code == 404 and r.json()["detail"]
    other_session, other_model = _new_model(api, OTHER)
    assert _copy(api, OTHER, source_path=src, session_id=other_session, model_seq_id=0).status_code == 404
    assert _copy(api, source_path=src, session_id=other_session, model_seq_id=0).status_code == 404  # not my session

    api.post(_ckpt_url(src, "/publish"), headers=KEY)
    copy = _copy(api, OTHER, source_path=src, destination_project_id="p").json()["tinker_path"]
    run_id = types.ParsedCheckpointTinkerPath.from_tinker_path(copy).training_run_id
    assert run_id != exported["model_id"]  # never inside the other key's run
    row = api.st.store.checkpoint(copy)
    assert row["public"] == 0 and api.st.store.model(run_id)["owner"] == row["owner"] != api.st.store.model(
        exported["model_id"])["owner"]
    runs = {r["training_run_id"]: r for r in api.get("/api/v1/training_runs", headers=OTHER).json()["training_runs"]}
    assert runs[run_id]["user_metadata"] == {"renderer_name": "qwen3_instruct", "copied_from": src}
    assert runs[run_id]["base_model"] == "tiny" and runs[run_id]["lora_rank"] == 4
    # The copy is private to its new owner.
    assert api.get(_ckpt_url(copy, "/external_weights_urls"), headers=KEY).status_code == 404
    assert _urls(api, copy, OTHER).urls
    copied_into = _copy(api, OTHER, source_path=src, session_id=other_session, model_seq_id=0).json()["tinker_path"]
    assert copied_into == f"tinker://{other_model}/external_weights/hf"
