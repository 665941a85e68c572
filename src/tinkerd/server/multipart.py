"""Reads a multipart/form-data body (`curl -F`, the OpenAI client's `files.create`) holding at most one file part,
bounded while it streams.

A body longer than the file limit plus `FIELDS_ALLOWANCE` (the text fields and part headers beside the file) is
refused at that byte, before the rest is read, and so is one whose `Content-Length` says so up front; a file
part over the limit is refused once it is parsed. Starlette's parser does the parsing; it spools the file part
to a temporary file that `Form.close` removes. Knows nothing of what the fields mean.
"""

from __future__ import annotations

from typing import AsyncIterator, Callable

from fastapi import Request, UploadFile
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser

from tinkerd.protocol.types import BadRequest

FIELDS_ALLOWANCE = 64 << 10
MAX_FIELDS = 32


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def read_form(request: Request, max_file_bytes: int, too_large: Callable[[], Exception],
                    file_field: str = "file") -> tuple[dict[str, str], UploadFile | None, FormData]:
    """(text fields, the file part or None, the form to `close`). A file part under another name than
    `file_field` is a `BadRequest` naming it; `too_large()` is raised for a file over the limit."""
    cap = max_file_bytes + FIELDS_ALLOWANCE
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise too_large()

    async def bounded() -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > cap:
                raise too_large()
            yield chunk

    parser = MultiPartParser(request.headers, bounded(), max_files=1, max_fields=MAX_FIELDS,
                             max_part_size=max_file_bytes)  # a text field may carry the file's text (curl -F 'file=<x')
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise BadRequest(f"body: not a multipart/form-data body this route reads ({e.message})") from None
    fields, upload = {}, None
    for name, value in form.multi_items():
        if isinstance(value, str):
            fields[name] = value
        elif name != file_field:
            await form.close()
            raise BadRequest(f"{name}: a file part; only the field {file_field} takes a file")
        else:
            upload = value
    if upload is not None and upload.size is not None and upload.size > max_file_bytes:
        await form.close()
        raise too_large()
    return fields, upload, form
