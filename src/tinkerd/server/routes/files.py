"""Uploaded files in the shape of OpenAI's files API, so `openai.OpenAI(base_url=".../api/v1").files` works:
upload (multipart, field `file`, optional `purpose`), list (`{"object": "list", "data", "has_more"}`, paged by
`after`), read, read the content, delete. A job names a file by id (`data_file`, `routes.jobs`).

A caller sees only its own files (404 otherwise). The key comes as `X-API-Key` or `Authorization: Bearer`.
Storage, limits and quota are `control.jobs.uploads`'.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from tinkerd.control.jobs.uploads import PURPOSES, Uploads, file_json
from tinkerd.protocol.types import BadRequest
from tinkerd.server.auth import key_or_bearer_caller
from tinkerd.server.deps import uploads
from tinkerd.server.multipart import is_multipart, read_form

router = APIRouter(prefix="/api/v1")
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "the file (a job's JSONL data)"},
        "purpose": {"type": "string", "enum": list(PURPOSES), "default": "fine-tune"}}}}}}}


@router.post("/files", openapi_extra=UPLOAD_BODY)
async def upload_file(request: Request, owner: str = Depends(key_or_bearer_caller),
                      files: Uploads = Depends(uploads)) -> dict:
    if not is_multipart(request):
        raise BadRequest("file: send the file as multipart/form-data in the field file (curl -F file=@chats.jsonl)")
    fields, upload, form = await read_form(request, files.max_bytes, files.too_large)
    try:
        if upload is None:
            raise BadRequest("file: missing; send the file as a file part named file (curl -F file=@chats.jsonl)")
        row = await run_in_threadpool(files.save, owner, upload.filename, fields.get("purpose"), upload.file)
    finally:
        await form.close()
    return file_json(row)


@router.get("/files")
def list_files(purpose: str | None = None, order: Literal["asc", "desc"] = "desc", after: str | None = None,
               limit: int = Query(10_000, ge=1, le=10_000), owner: str = Depends(key_or_bearer_caller),
               files: Uploads = Depends(uploads)) -> dict:
    rows, more = files.listing(owner, purpose, order, after, limit)
    data = [file_json(r) for r in rows]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


@router.get("/files/{file_id}")
def get_file(file_id: str, owner: str = Depends(key_or_bearer_caller), files: Uploads = Depends(uploads)) -> dict:
    return file_json(files.owned(owner, file_id))


@router.get("/files/{file_id}/content")
def file_content(file_id: str, owner: str = Depends(key_or_bearer_caller),
                 files: Uploads = Depends(uploads)) -> FileResponse:
    row = files.owned(owner, file_id)
    return FileResponse(files.path(row), media_type="application/octet-stream", filename=row["filename"])


@router.delete("/files/{file_id}")
def delete_file(file_id: str, owner: str = Depends(key_or_bearer_caller), files: Uploads = Depends(uploads)) -> dict:
    return {"id": files.delete(owner, file_id)["id"], "object": "file", "deleted": True}
