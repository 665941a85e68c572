"""Getting weights out: save_weights_external, download links (per file, and the old .tar.gz archive),
the download route itself, and copy_weights.

- `POST /save_weights_external` queues, in the model's seq_id order, a save of the adapter as a
  standard PEFT folder (the trainer's `save_sampler_weights`) as checkpoint kind `external_weights`.
  age encryption is not supported: a request with recipients gets a 400.
- `GET /training_runs/{run}/checkpoints/{kind}/{name}/external_weights_urls` answers one URL per file
  of a readable checkpoint (the SDK only asks for `external_weights/...`; other kinds work too).
- `GET .../archive` (SDKs before 0.36) answers `{url, expires}` for a .tar.gz of the checkpoint's files
  (at the archive's root). The archive is built once per checkpoint version under
  `DATA_DIR/archives` (temp file, then rename) and swept once no link can reach it any more.
- `GET /files/{token}/{relative_path}` needs no API key (the cookbook fetches with plain urllib): the
  token is random (256 bits), lives in this process's memory for an hour, and names the exact set
  of files it may serve, so no path outside that set is reachable. A link stops working when it
  expires, when the server restarts, or when its checkpoint is deleted or expires.
- `POST /copy_weights` copies a readable checkpoint (hard links when the file system allows:
  checkpoint files are never modified in place) into a new checkpoint owned by the caller, with the
  source's kind: under `{session_id}:train:{model_seq_id}` when given (a model of the caller), else
  under the source's run with a suffixed name when the caller owns that run, else under a new run
  in a new session of the caller (never in another key's run). `destination_project_id` is
  accepted and ignored (tinkerd has no projects); the SDK's `X-Idempotency-Key` makes a retried
  copy return the first copy's path (remembered in memory).

Knows the Store rows and checkpoint folders; does not know how adapters are written (the trainer)
or merged into a base model (`tinkerd.engine.export`, used by the `tinkerd export` command).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tarfile
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse

from tinkerd.protocol.requests import CopyWeightsRequest, SaveWeightsExternalRequest
from tinkerd.protocol.sample import parse_tinker_path
from tinkerd.protocol.types import BadRequest
from tinkerd.server import journal
from tinkerd.server.auth import caller
from tinkerd.server.checkpoint_access import is_expired, readable_checkpoint
from tinkerd.server.routes.checkpoints import checkpoint_name
from tinkerd.server.routes.rest import CHECKPOINT, CHECKPOINT_TYPES, MAX_TTL_SECONDS
from tinkerd.server.routes.training import CHECKPOINT_NAME, submit_training
from tinkerd.server.scheduler import Outcome
from tinkerd.server.state import NotFound, ServerState

router = APIRouter(prefix="/api/v1")
URL_TTL_SECONDS = 3600
ARCHIVE_DIR = "archives"
COPIES_REMEMBERED = 10_000


@dataclass(frozen=True)
class Grant:
    """What one download token may serve: {relative path: file}, for one checkpoint, until `expires_at`."""

    checkpoint_path: str
    files: dict[str, Path]
    expires_at: float


class ExportState:
    """In-memory download tokens and idempotent copies of one app (created on first use)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._grants: dict[str, Grant] = {}
        self._copies: dict[tuple[str, str], str] = {}

    def grant(self, checkpoint_path: str, files: dict[str, Path], ttl: float = URL_TTL_SECONDS) -> tuple[str, Grant]:
        token, now = secrets.token_urlsafe(32), time.time()
        grant = Grant(checkpoint_path, files, now + ttl)
        with self._lock:
            self._grants = {t: g for t, g in self._grants.items() if g.expires_at > now}
            self._grants[token] = grant
        return token, grant

    def lookup(self, token: str) -> Grant | None:
        with self._lock:
            grant = self._grants.get(token)
        return grant if grant is not None and grant.expires_at > time.time() else None

    def copied(self, owner: str, key: str | None) -> str | None:
        with self._lock:
            return self._copies.get((owner, key)) if key else None

    def remember_copy(self, owner: str, key: str | None, tinker_path: str) -> None:
        if key:
            with self._lock:
                self._copies[(owner, key)] = tinker_path
                while len(self._copies) > COPIES_REMEMBERED:  # dicts keep insertion order: drop the oldest
                    del self._copies[next(iter(self._copies))]


_init_lock = threading.Lock()


def export_state(request: Request) -> ExportState:
    with _init_lock:
        es = getattr(request.app.state, "tinkerd_export", None)
        if es is None:
            es = request.app.state.tinkerd_export = ExportState()
    return es


def _state(request: Request) -> ServerState:
    return request.app.state.tinkerd


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat()


def _check_ttl(ttl_seconds: int | None) -> None:
    if ttl_seconds is not None and not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
        raise BadRequest(f"ttl_seconds must be in [1, {MAX_TTL_SECONDS}] or null, got {ttl_seconds}")


def checkpoint_files(directory: str | Path) -> dict[str, Path]:
    """{posix path relative to the folder: file} for every regular file in a checkpoint folder."""
    root = Path(directory)
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _readable(st: ServerState, owner: str, run_id: str, kind: str, name: str) -> dict:
    if kind not in CHECKPOINT_TYPES:
        raise BadRequest(f"checkpoint_id: expected '<{'|'.join(CHECKPOINT_TYPES)}>/<name>', got {kind + '/' + name!r}")
    return readable_checkpoint(st, owner, f"tinker://{run_id}/{kind}/{name}")


def _url(request: Request, token: str, relative_path: str) -> str:
    return f"{str(request.base_url).rstrip('/')}/api/v1/files/{token}/{quote(relative_path)}"


# save_weights_external

@router.post("/save_weights_external")
async def save_weights_external(body: SaveWeightsExternalRequest, request: Request, owner: str = Depends(caller)):
    st = _state(request)
    st.model(body.model_id, owner)
    if body.age_encryption_recipients:
        raise BadRequest("age_encryption_recipients: age encryption is not supported by this tinkerd server; "
                         "save without recipients (the download links are unguessable and expire in 1 hour)")
    if not body.path:
        raise BadRequest("path: a name for the external weights is required")
    name = checkpoint_name(body.path)
    _check_ttl(body.ttl_seconds)
    return submit_training(st, owner, body.model_id, body.seq_id, "save_weights_external",
                           {**body.model_dump(mode="json"), "path": name})


@journal.replayable("save_weights_external", changes_state=False)
def _save_weights_external_job(op: journal.Op) -> dict:
    st, body = op.st, SaveWeightsExternalRequest(**op.args)
    tinker_path = f"tinker://{op.model_id}/external_weights/{body.path}"
    directory = st.checkpoint_dir(op.model_id, "external_weights", body.path)

    def run() -> Outcome:
        st.trainer.save_sampler_weights(op.model_id, directory)
        st.store.add_checkpoint(tinker_path, op.model_id, op.owner, "external_weights", body.path, str(directory),
                                st.store.model(op.model_id)["base_model"])
        st.store.set_checkpoint_ttl(tinker_path, body.ttl_seconds)
        size = sum(f.stat().st_size for f in checkpoint_files(directory).values())
        return Outcome(json={"path": tinker_path, "size_bytes": size, "type": "save_weights_external"})

    return {"run": run}


# Download links. Plain `def`: SQLite and disk work run in FastAPI's thread pool.

@router.get(CHECKPOINT + "/external_weights_urls")
def external_weights_urls(run_id: str, kind: str, name: str, request: Request, owner: str = Depends(caller)):
    st = _state(request)
    row = _readable(st, owner, run_id, kind, name)
    files = checkpoint_files(row["directory"])
    if not files:
        raise NotFound(f"checkpoint {row['path']!r} has no files on disk")
    token, grant = export_state(request).grant(row["path"], files)
    return {"urls": {rel: _url(request, token, rel) for rel in files}, "expires": _iso(grant.expires_at)}


@router.get(CHECKPOINT + "/archive")
def checkpoint_archive(run_id: str, kind: str, name: str, request: Request, owner: str = Depends(caller)):
    """For SDKs before 0.36: `{url, expires}` of a .tar.gz holding the checkpoint's files."""
    st = _state(request)
    row = _readable(st, owner, run_id, kind, name)
    archive = build_archive(st.config.data_dir / ARCHIVE_DIR, row)
    token, grant = export_state(request).grant(row["path"], {archive.name: archive})
    return {"url": _url(request, token, archive.name), "expires": _iso(grant.expires_at)}


def build_archive(archive_dir: Path, row: dict) -> Path:
    """The checkpoint's files as `<archive_dir>/<id>.tar.gz` (reused while the checkpoint is unchanged).

    Archives older than a download link's lifetime are swept first; reusing one refreshes its age.
    """
    archive_dir.mkdir(parents=True, exist_ok=True)
    stale_before = time.time() - URL_TTL_SECONDS - 600
    for old in archive_dir.iterdir():
        try:
            if old.stat().st_mtime < stale_before:
                old.unlink()
        except OSError:
            pass
    files = checkpoint_files(row["directory"])
    if not files:
        raise NotFound(f"checkpoint {row['path']!r} has no files on disk")
    version = hashlib.sha256(f"{row['path']}\0{row['created']!r}".encode()).hexdigest()[:32]
    archive = archive_dir / f"{row['name']}-{version}.tar.gz"
    if archive.is_file():
        os.utime(archive)
        return archive
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".tar.gz", dir=archive_dir)
    try:
        with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w:gz", compresslevel=1) as tar:
            for rel, path in files.items():
                tar.add(path, arcname=rel, recursive=False)
        os.replace(tmp, archive)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return archive


@router.get("/files/{token}/{relative_path:path}")
def download(token: str, relative_path: str, request: Request):
    """Serve one file of a download grant; no API key (the unguessable token is the credential)."""
    st = _state(request)
    grant = export_state(request).lookup(token)
    if grant is None:
        return JSONResponse({"detail": "download link unknown or expired; ask for new URLs"}, status_code=404)
    path = grant.files.get(relative_path)
    if path is None:
        return JSONResponse({"detail": f"{relative_path!r} is not a file of this download"}, status_code=404)
    row = st.store.checkpoint(grant.checkpoint_path)
    if row is None or is_expired(row) or not path.is_file():
        return JSONResponse({"detail": f"checkpoint {grant.checkpoint_path!r} no longer exists"}, status_code=404)
    return FileResponse(path, filename=path.name, media_type="application/octet-stream")


# copy_weights

@router.post("/copy_weights")
def copy_weights(body: CopyWeightsRequest, request: Request, owner: str = Depends(caller)):
    st = _state(request)
    es = export_state(request)
    key = request.headers.get("x-idempotency-key")
    previous = es.copied(owner, key)
    if previous is not None and st.store.checkpoint(previous) is not None:
        return {"tinker_path": previous}
    _, kind, _ = parse_tinker_path(body.source_path, "source_path")
    if kind not in CHECKPOINT_TYPES:
        raise BadRequest(f"source_path: unknown checkpoint kind {kind!r}; expected one of {sorted(CHECKPOINT_TYPES)}")
    _check_ttl(body.ttl_seconds)
    source = readable_checkpoint(st, owner, body.source_path)
    model_id = _copy_destination(st, owner, body, source)
    name = _free_name(st, model_id, kind, source["name"])
    tinker_path = f"tinker://{model_id}/{kind}/{name}"
    directory = st.checkpoint_dir(model_id, kind, name)
    _link_or_copy_tree(Path(source["directory"]), directory)
    st.store.add_checkpoint(tinker_path, model_id, owner, kind, name, str(directory), source["base_model"],
                            user_metadata=source.get("user_metadata"))
    st.store.set_checkpoint_ttl(tinker_path, body.ttl_seconds)
    es.remember_copy(owner, key, tinker_path)
    return {"tinker_path": tinker_path}


def _copy_destination(st: ServerState, owner: str, body: CopyWeightsRequest, source: dict) -> str:
    if body.session_id is not None or body.model_seq_id is not None:
        if body.session_id is None or body.model_seq_id is None:
            raise BadRequest("copy_weights: give both session_id and model_seq_id, or neither")
        st.session(body.session_id, owner)
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
        st.model(model_id, owner)
        return model_id
    source_model = st.store.model(source["model_id"])
    if source_model is not None and source_model["owner"] == owner:
        return source_model["id"]
    # Another key's (published) checkpoint: a new run of the caller's, which is never trained on.
    session_id = f"s-{uuid.uuid4().hex[:16]}"
    model_id = f"{session_id}:train:0"
    st.store.add_session(session_id, owner, None, ["copy_weights"], {})
    lora = (source_model or {}).get("lora_config") or {}
    # The source run's metadata (the cookbook reads `renderer_name` there) is visible to whoever may read
    # the published checkpoint anyway (`access_scope=accessible`).
    metadata = {**((source_model or {}).get("user_metadata") or {}), "copied_from": source["path"]}
    st.store.add_model(model_id, session_id, owner, source["base_model"], lora, metadata)
    return model_id


def _free_name(st: ServerState, model_id: str, kind: str, name: str) -> str:
    if st.store.checkpoint(f"tinker://{model_id}/{kind}/{name}") is None:
        return name
    while True:
        candidate = f"{name[:110]}-copy-{secrets.token_hex(3)}"
        if CHECKPOINT_NAME.match(candidate) and st.store.checkpoint(f"tinker://{model_id}/{kind}/{candidate}") is None:
            return candidate


def _link_or_copy_tree(source: Path, destination: Path) -> None:
    """Hard-link (or copy, across file systems) a checkpoint folder into place via a temp folder and rename."""
    if not source.is_dir():
        raise NotFound(f"the source checkpoint's files are missing ({source})")

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=destination.parent))
    try:
        shutil.copytree(source, tmp / "copy", copy_function=link, symlinks=False)
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(tmp / "copy", destination)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
