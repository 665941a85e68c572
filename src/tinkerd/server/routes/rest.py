"""The REST API of the SDK's `RestClient` and the `tinker` CLI: training runs, checkpoints (list,
delete, publish, TTL), weights_info and sessions. Every reply is JSON, every error `{"detail"}`.

What it knows: the Store's rows and the checkpoint directories they name. A training run is a row
of `models`; a checkpoint is a row of `checkpoints` plus its directory. A caller sees what its
API key created. A *published* checkpoint is also readable by every key (`weights_info`, and
loading and sampling), is listed in its run's
checkpoints for everyone, and makes its run visible to others under `access_scope=accessible`.
Only the owner may delete, publish, unpublish or set a TTL. An expired checkpoint (past its
`expires_at`) reads as not found; listing anything deletes every expired checkpoint, row and
directory, as does `purge_expired`.

What it does not know: how checkpoints are written or loaded (the trainer does that), futures,
or projects (`project_id` is ignored). Deleting a checkpoint does not unload it from a sampler
that already read it.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from fastapi import APIRouter, Depends

from tinkerd.control.checkpoints import (
    KINDS,
    check_ttl,
    checkpoint_path,
    is_expired,
    owned_checkpoint,
    purge_expired,
    readable_checkpoint,
    remove_checkpoint,
)
from tinkerd.control import audit
from tinkerd.control.plane import ControlPlane
from tinkerd.protocol.numbers import INT64_MAX
from tinkerd.protocol.paths import owner_urn, parse_tinker_path
from tinkerd.protocol.requests import Body
from tinkerd.protocol.types import BadRequest
from tinkerd.server.auth import caller
from tinkerd.server.deps import plane
from tinkerd.server.routes import CHECKPOINT

router = APIRouter(prefix="/api/v1")
MAX_PAGE = 1000


class TTLBody(Body):
    ttl_seconds: int | None


class WeightsInfoBody(Body):
    tinker_path: str


# JSON shapes (tinker.types.TrainingRun, Checkpoint, Cursor)

def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat()


def _strings(meta: dict | None) -> dict | None:
    """The SDK types metadata as dict[str, str]; other values go out as JSON text."""
    if meta is None:
        return None
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def _size_bytes(directory: str) -> int | None:
    path = Path(directory)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoint_json(row: dict) -> dict:
    return {
        "checkpoint_id": f"{row['kind']}/{row['name']}",
        "checkpoint_type": KINDS[row["kind"]],
        "time": _iso(row["created"]),
        "tinker_path": row["path"],
        "training_run_id": row["model_id"],  # not in the SDK's type (ignored there); handy for other clients
        "size_bytes": _size_bytes(row["directory"]),
        "public": bool(row["public"]),
        "user_metadata": _strings(row.get("user_metadata")),
        "expires_at": _iso(row.get("expires_at")),
    }


def _run_json(st: ControlPlane, model: dict, checkpoints: list[dict]) -> dict:
    def newest(kind: str) -> dict | None:
        return next((checkpoint_json(c) for c in checkpoints if c["kind"] == kind), None)

    last_request = st.store.model_last_request(model["id"]) or model["created"]
    return {
        "training_run_id": model["id"],
        "base_model": model["base_model"],
        "model_owner": owner_urn(model["owner"]),
        "is_lora": True,
        "corrupted": False,
        "lora_rank": (model["lora_config"] or {}).get("rank"),
        "last_request_time": _iso(last_request),
        "created_time": _iso(model["created"]),  # not in the SDK's type (ignored there); the console shows it
        "last_checkpoint": newest("weights"),
        "last_sampler_checkpoint": newest("sampler_weights"),
        "user_metadata": _strings(model["user_metadata"]),
    }


# Lookups with the visibility rules

def _page(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise BadRequest(f"limit must be in [1, {MAX_PAGE}], got {limit}")
    if not 0 <= offset <= INT64_MAX:
        raise BadRequest(f"offset must be in [0, {INT64_MAX}], got {offset}")


def _accessible(access_scope: str) -> bool:
    if access_scope not in ("owned", "accessible"):
        raise BadRequest(f"access_scope must be 'owned' or 'accessible', got {access_scope!r}")
    return access_scope == "accessible"


def _cursor(offset: int, limit: int, total: int) -> dict:
    return {"offset": offset, "limit": limit, "total_count": total}


def _visible_checkpoints(st: ControlPlane, model: dict, owner: str) -> list[dict]:
    """The run's live checkpoints, newest first: all of them for its owner, the published ones for others."""
    rows = [c for c in st.store.model_checkpoints(model["id"]) if not is_expired(c)]
    return rows if model["owner"] == owner else [c for c in rows if c["public"]]


def _run(st: ControlPlane, owner: str, run_id: str, accessible: bool) -> tuple[dict, list[dict]]:
    """A run and the checkpoints the caller may see; another key's run only if `accessible` and it has
    a published checkpoint."""
    model = st.store.model(run_id)
    if model is not None and model["owner"] != owner and accessible:
        checkpoints = _visible_checkpoints(st, model, owner)
        if checkpoints:
            return model, checkpoints
    model = st.owned(model, owner, "training_run_id", run_id)
    return model, _visible_checkpoints(st, model, owner)


def _owned_checkpoint(st: ControlPlane, owner: str, run_id: str, kind: str, name: str) -> dict:
    return owned_checkpoint(st, owner, checkpoint_path(run_id, kind, name))


# Routes. Plain `def`: they do blocking SQLite and disk work, so FastAPI runs them in its thread pool.

@router.get("/training_runs")
def list_training_runs(limit: int = 20, offset: int = 0, access_scope: str = "owned",
                       owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    _page(limit, offset)
    accessible = _accessible(access_scope)
    purge_expired(st)
    models, total = st.store.list_models(owner, limit, offset, with_public=accessible)
    runs = [_run_json(st, m, _visible_checkpoints(st, m, owner)) for m in models]
    return {"training_runs": runs, "cursor": _cursor(offset, limit, total)}


@router.get("/training_runs/{run_id}")
def get_training_run(run_id: str, access_scope: str = "owned", owner: str = Depends(caller),
                     st: ControlPlane = Depends(plane)):
    return _run_json(st, *_run(st, owner, run_id, _accessible(access_scope)))


@router.get("/training_runs/{run_id}/checkpoints")
def list_run_checkpoints(run_id: str, owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    purge_expired(st)
    _, checkpoints = _run(st, owner, run_id, accessible=True)
    return {"checkpoints": [checkpoint_json(c) for c in checkpoints]}


# `checkpoint_id` is "{kind}/{name}" and names have no "/", so two path segments match it exactly
# and ".../weights/publish" stays a checkpoint named "publish", not the publish route.
@router.delete(CHECKPOINT)
def delete_checkpoint(run_id: str, kind: str, name: str, owner: str = Depends(caller),
                      st: ControlPlane = Depends(plane)):
    row = _owned_checkpoint(st, owner, run_id, kind, name)
    remove_checkpoint(st, row)
    audit.record(st, owner, "checkpoint_delete", run_id, row["path"])
    return {}


@router.post(CHECKPOINT + "/publish")
def publish_checkpoint(run_id: str, kind: str, name: str, owner: str = Depends(caller),
                       st: ControlPlane = Depends(plane)):
    path = _owned_checkpoint(st, owner, run_id, kind, name)["path"]
    st.store.set_checkpoint_public(path, True)
    audit.record(st, owner, "checkpoint_publish", run_id, path)
    return {}


@router.delete(CHECKPOINT + "/publish")
def unpublish_checkpoint(run_id: str, kind: str, name: str, owner: str = Depends(caller),
                         st: ControlPlane = Depends(plane)):
    path = _owned_checkpoint(st, owner, run_id, kind, name)["path"]
    st.store.set_checkpoint_public(path, False)
    audit.record(st, owner, "checkpoint_unpublish", run_id, path)
    return {}


@router.put(CHECKPOINT + "/ttl")
def set_checkpoint_ttl(run_id: str, kind: str, name: str, body: TTLBody,
                       owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    row = _owned_checkpoint(st, owner, run_id, kind, name)
    check_ttl(body.ttl_seconds)
    st.store.set_checkpoint_ttl(row["path"], body.ttl_seconds)
    return {}


@router.get("/checkpoints")
def list_user_checkpoints(limit: int = 100, offset: int = 0, owner: str = Depends(caller),
                          st: ControlPlane = Depends(plane)):
    _page(limit, offset)
    purge_expired(st)
    rows, total = st.store.list_checkpoints(owner, limit, offset)
    return {"checkpoints": [checkpoint_json(c) for c in rows], "cursor": _cursor(offset, limit, total)}


@router.post("/weights_info")
def weights_info(body: WeightsInfoBody, owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    parse_tinker_path(body.tinker_path, "tinker_path")
    row = readable_checkpoint(st, owner, body.tinker_path)
    lora = (st.store.model(row["model_id"]) or {}).get("lora_config") or {}
    return {"base_model": row["base_model"], "is_lora": True, "lora_rank": lora.get("rank"),
            "train_unembed": lora.get("train_unembed"), "train_mlp": lora.get("train_mlp"),
            "train_attn": lora.get("train_attn")}


@router.get("/sessions")
def list_sessions(limit: int = 20, offset: int = 0, access_scope: str = "owned",
                  owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    _page(limit, offset)
    _accessible(access_scope)
    rows, total = st.store.list_sessions(owner, limit, offset)
    return {"sessions": [r["id"] for r in rows], "cursor": _cursor(offset, limit, total)}


@router.get("/sessions/{session_id}")
def get_session(session_id: str, access_scope: str = "owned", owner: str = Depends(caller),
                st: ControlPlane = Depends(plane)):
    _accessible(access_scope)
    session = st.session(session_id, owner)
    return {"training_run_ids": st.store.session_model_ids(session_id),
            "sampler_ids": st.store.session_sampler_ids(session_id),
            "user_metadata": _strings(session["user_metadata"])}
