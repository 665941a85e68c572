"""Identity as the SDK asks for it: the key-for-token exchange, whoami, owner ids in the hosted URN form, the key's
own metadata, and the audit log (each key its own events, an admin key all)."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timezone

import pytest
import tinker
from fastapi.testclient import TestClient

from tinkerd.control.plane import ServerConfig
from tinkerd.engine.sampler import LocalSampler
from tinkerd.engine.trainer import LocalTrainer
from tinkerd.server.app import create_app
from tinkerd.server.identity import Tokens
from tests.app_client import future_result
from tests.conftest import make_tiny_runtime
from tests.control.test_lifecycle import DATUM
from tests.inprocess_server import inprocess_server

ALICE, BOB, ADMIN = "tml-alice-key", "tml-bob-key", "tml-admin-key"
NAMES = {ALICE: "alice laptop", BOB: None, ADMIN: "operator"}


def _urn(key: str) -> str:
    return "tml:organization_user:" + hashlib.sha256(key.encode()).hexdigest()[:24]


def _claims(jwt: str) -> dict:
    payload = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


CONFIG = dict(api_keys=frozenset(NAMES), key_names=NAMES, admin_keys=frozenset({ADMIN}))


def test_the_sdk_trains_with_tokens_and_whoami_answers_the_key_derived_id(tmp_path):
    with inprocess_server(tmp_path, **CONFIG) as (url, _):
        service = tinker.ServiceClient(base_url=url, api_key=ALICE)
        assert service.holder.get_client_config().pjwt_auth_enabled is True
        training = service.create_lora_training_client(base_model="tiny", rank=4, seed=0).result()
        rest = tinker.RestClient(base_url=url, api_key=ALICE)
        me = rest.whoami().result()
        assert me.user_urn == _urn(ALICE) and ALICE not in me.user_urn
        assert me.org_urn == "tml:organization:self-hosted"
        assert rest.get_training_run(training.model_id).result().model_owner == me.user_urn
        with pytest.raises(tinker.AuthenticationError):
            tinker.ServiceClient(base_url=url, api_key="tml-not-a-key").create_lora_training_client(
                base_model="tiny", rank=4).result()


@pytest.fixture
def api(tmp_path):
    runtimes = {"tiny": make_tiny_runtime()}
    app = create_app(ServerConfig(data_dir=tmp_path, long_poll_seconds=5, **CONFIG), LocalTrainer(runtimes),
                     LocalSampler(runtimes))
    with TestClient(app) as client:
        yield client


def test_tokens_carry_the_key_name_and_bad_or_stale_tokens_ask_for_a_new_exchange(api, tmp_path):
    jwt = api.post("/api/v1/auth/token", json={}, headers={"X-API-Key": ALICE}).json()["jwt"]
    claims = _claims(jwt)
    assert claims["sub"] == _urn(ALICE) and claims["name"] == "alice laptop" and claims["exp"] > claims["iat"]
    assert ALICE not in json.dumps(claims)
    me = api.get("/api/v1/auth/apikey/me", headers={"X-API-Key": jwt}).json()
    assert me["name"] == "alice laptop" and isinstance(me["key_id"], int)
    assert api.get("/api/v1/auth/apikey/me", headers={"X-API-Key": BOB}).json()["name"] == _urn(BOB)[-24:]
    forged = jwt[:-4] + ("AAAA" if not jwt.endswith("AAAA") else "BBBB")
    expired = Tokens((tmp_path / "auth-secret").read_bytes(), lifetime=-1).mint(_urn(ALICE)[-24:], None)
    gone = Tokens((tmp_path / "auth-secret").read_bytes()).mint("0" * 24, None)  # a key no longer accepted
    for token in (forged, expired, gone):
        r = api.post("/api/v1/create_session", json={"tags": []}, headers={"X-API-Key": token})
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
    assert api.post("/api/v1/auth/token", json={}, headers={"X-API-Key": "tml-nope"}).status_code == 401


def _train_and_checkpoint(api, key):
    headers = {"X-API-Key": key}
    session = api.post("/api/v1/create_session", json={"tags": []}, headers=headers).json()["session_id"]
    fut = api.post("/api/v1/create_model", headers=headers, json={
        "session_id": session, "model_seq_id": 0, "base_model": "tiny", "lora_config": {"rank": 4}}).json()
    model_id = future_result(api, fut["request_id"], headers)["model_id"]
    r = api.post("/api/v1/save_weights", headers=headers, json={"model_id": model_id, "path": "ckpt", "seq_id": 1})
    path = future_result(api, r.json()["request_id"], headers)["path"]
    checkpoint = f"/api/v1/training_runs/{model_id}/checkpoints/weights/ckpt"
    assert api.post(checkpoint + "/publish", headers=headers).status_code == 200
    assert api.get(checkpoint + "/external_weights_urls", headers=headers).status_code == 200
    assert api.delete(checkpoint, headers=headers).status_code == 200
    return model_id, path


def test_the_audit_log_shows_each_key_its_own_events_and_the_admin_all(api):
    alice_run, alice_path = _train_and_checkpoint(api, ALICE)
    bob_run, _ = _train_and_checkpoint(api, BOB)
    mine = api.get("/api/v1/audit", headers={"X-API-Key": ALICE}).json()["entries"]
    events = [(e["event"], e.get("tinker_path")) for e in mine]
    assert events[:2] == [("training_run_create", None), ("checkpoint_create", alice_path)]
    assert events[2:] == [("checkpoint_publish", alice_path), ("checkpoint_read", alice_path),
                          ("checkpoint_delete", alice_path)]
    assert all(e["event_details"]["actor"] == _urn(ALICE) for e in mine)
    assert {e["model_id"] for e in mine} == {alice_run}
    everyone = api.get("/api/v1/audit", headers={"X-API-Key": ADMIN}).json()["entries"]
    assert {e["model_id"] for e in everyone} == {alice_run, bob_run}
    assert [e["timestamp"] for e in everyone] == sorted(e["timestamp"] for e in everyone)
    only_checkpoints = api.get("/api/v1/audit", params={"event_type": "checkpoints"}, headers={"X-API-Key": ALICE})
    assert {e["event"].split("_")[0] for e in only_checkpoints.json()["entries"]} == {"checkpoint"}
    yesterday = datetime.now(timezone.utc).date().replace(year=2000).isoformat()
    assert api.get("/api/v1/audit", params={"day": yesterday}, headers={"X-API-Key": ADMIN}).json()["entries"] == []
    assert api.get("/api/v1/audit", params={"day": "tuesday"}, headers={"X-API-Key": ADMIN}).status_code == 400
