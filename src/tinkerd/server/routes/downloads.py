"""Download links for checkpoint files, and the download route itself (`control.downloads` keeps the tokens).

- `GET /training_runs/{run}/checkpoints/{kind}/{name}/external_weights_urls` answers one URL per file
  of a readable checkpoint (the SDK only asks for `external_weights/...`; other kinds work too).
- `GET .../archive` (SDKs before 0.36) answers `{url, expires}` for a .tar.gz of the checkpoint's files
  (at the archive's root).
- `GET /downloads/{token}/{relative_path}` needs no API key (the cookbook fetches with plain urllib): the
  unguessable token is the credential, and serves only the files it was granted for. HEAD works too. (Tokens
  live in memory, so no link outlives its process; `/files` is the uploaded files', `routes.files`.)

Plain `def` routes: SQLite and disk work run in FastAPI's thread pool.
"""

from __future__ import annotations

from datetime import datetime, timezone
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse

from tinkerd.control import audit
from tinkerd.control.checkpoints import checkpoint_files, checkpoint_path, is_expired, readable_checkpoint
from tinkerd.control.downloads import DownloadGrants, build_archive
from tinkerd.control.plane import ControlPlane, NotFound
from tinkerd.server.auth import caller
from tinkerd.server.deps import download_grants, plane
from tinkerd.server.routes import CHECKPOINT

router = APIRouter(prefix="/api/v1")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat()


def _url(request: Request, token: str, relative_path: str) -> str:
    return f"{str(request.base_url).rstrip('/')}/api/v1/downloads/{token}/{quote(relative_path)}"


@router.get(CHECKPOINT + "/external_weights_urls")
def external_weights_urls(run_id: str, kind: str, name: str, request: Request, owner: str = Depends(caller),
                          st: ControlPlane = Depends(plane), grants: DownloadGrants = Depends(download_grants)):
    row = readable_checkpoint(st, owner, checkpoint_path(run_id, kind, name))
    files = checkpoint_files(row["directory"])
    if not files:
        raise NotFound(f"checkpoint {row['path']!r} has no files on disk")
    token, grant = grants.grant(row["path"], files)
    audit.record(st, owner, "checkpoint_read", run_id, row["path"], purpose="download")
    return {"urls": {rel: _url(request, token, rel) for rel in files}, "expires": _iso(grant.expires_at)}


@router.get(CHECKPOINT + "/archive")
def checkpoint_archive(run_id: str, kind: str, name: str, request: Request, owner: str = Depends(caller),
                       st: ControlPlane = Depends(plane), grants: DownloadGrants = Depends(download_grants)):
    """For SDKs before 0.36: `{url, expires}` of a .tar.gz holding the checkpoint's files."""
    row = readable_checkpoint(st, owner, checkpoint_path(run_id, kind, name))
    archive = build_archive(st.paths.archives, row)
    token, grant = grants.grant(row["path"], {archive.name: archive})
    audit.record(st, owner, "checkpoint_read", run_id, row["path"], purpose="download")
    return {"url": _url(request, token, archive.name), "expires": _iso(grant.expires_at)}


@router.get("/downloads/{token}/{relative_path:path}")
@router.head("/downloads/{token}/{relative_path:path}", include_in_schema=False)
def download(token: str, relative_path: str, st: ControlPlane = Depends(plane),
             grants: DownloadGrants = Depends(download_grants)):
    """Serve one file of a download grant; no API key (the unguessable token is the credential). HEAD answers
    the same status and headers (size, type) without the body, as download tools check URLs with it."""
    grant = grants.lookup(token)
    if grant is None:
        return JSONResponse({"detail": "download link unknown or expired; ask for new URLs"}, status_code=404)
    path = grant.files.get(relative_path)
    if path is None:
        return JSONResponse({"detail": f"{relative_path!r} is not a file of this download"}, status_code=404)
    row = st.store.checkpoint(grant.checkpoint_path)
    if row is None or is_expired(row) or not path.is_file():
        return JSONResponse({"detail": f"checkpoint {grant.checkpoint_path!r} no longer exists"}, status_code=404)
    return FileResponse(path, filename=path.name, media_type="application/octet-stream")
