"""What `POST /api/v1/jobs` reads, as the keyword arguments of `JobManager.submit`, and its OpenAPI body.

Two shapes of one request:
- JSON: `{"kind", "data": JSONL text | "data_file": an uploaded file's id (alias `training_file`, OpenAI's name),
  "base_model"?, "grader"?, "budget"?, "hyperparameters"?}`;
- multipart/form-data (`curl -F file=@chats.jsonl -F kind=sft`): the data as the file part `file` (or a
  `data_file` / `training_file` field), the other fields as text; `grader`, `budget` and `hyperparameters` may be
  JSON (`-F 'hyperparameters={"rank": 8}'`), a grader or budget also a plain name or string (`-F grader=exact_match`).

Knows the wire names; what the values must be is `control.jobs.spec` and `control.jobs.files`'.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from tinkerd.control.jobs.spec import JobInputError
from tinkerd.control.jobs.uploads import too_large
from tinkerd.protocol.requests import Body
from tinkerd.server.multipart import is_multipart, read_form

TEXT_FIELDS = ("kind", "base_model", "data_file", "training_file")
JSON_FIELDS = ("grader", "budget", "hyperparameters")


class JobRequest(Body):
    kind: Any = None
    data: Any = None  # the JSONL file's text
    data_file: Any = None  # or an uploaded file's id (POST /api/v1/files)
    training_file: Any = None  # data_file by OpenAI's name
    base_model: str | None = None  # default: the first base model served
    grader: Any = None
    budget: Any = None  # "15m", "40 steps", or {"minutes": M, "steps": N}; default 15 minutes
    hyperparameters: Any = None


OPENAPI = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": JobRequest.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary", "description": "the JSONL data"},
        **{name: {"type": "string"} for name in TEXT_FIELDS + JSON_FIELDS}}}}}}}


async def job_arguments(request: Request, max_file_bytes: int) -> dict:
    """`submit`'s keyword arguments (base_model None: the caller picks the default), from either shape."""
    if is_multipart(request):
        return await _from_form(request, max_file_bytes)
    try:
        raw = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JobInputError(f"body: not valid JSON ({e}); send JSON, or multipart/form-data with the file in the "
                            "field file") from None
    try:
        body = JobRequest.model_validate(raw)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None
    args = body.model_dump(exclude={"training_file"})
    return _alias(args, body.training_file)


def _alias(args: dict, training_file) -> dict:
    if training_file is not None:
        if args["data_file"] is not None:
            raise JobInputError("data_file, training_file: both given; training_file is data_file's other name")
        args.update(data_file=training_file, data_file_field="training_file")
    return args


async def _from_form(request: Request, max_file_bytes: int) -> dict:
    fields, upload, form = await read_form(request, max_file_bytes, lambda: too_large(max_file_bytes))
    try:
        unknown = sorted(set(fields) - {"file", *TEXT_FIELDS, *JSON_FIELDS})
        if unknown:
            raise JobInputError(f"{', '.join(unknown)}: not a field of a job form; it takes file, "
                                f"{', '.join(TEXT_FIELDS + JSON_FIELDS)}")
        data = fields.get("file")  # the file's text as a text field (curl -F 'file=<chats.jsonl')
        if upload is not None:
            raw = await upload.read()
            try:
                data = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise JobInputError(f"file: not UTF-8 text (byte {e.start}); a job's data is JSONL") from None
    finally:
        await form.close()
    args = {name: fields.get(name) or None for name in TEXT_FIELDS if name != "training_file"}
    args.update({name: _json_field(name, fields.get(name)) for name in JSON_FIELDS}, data=data, data_field="file")
    return _alias(args, fields.get("training_file") or None)


def _json_field(name: str, text: str | None):
    """A form field that may hold JSON: an object, array, number or quoted string is parsed; other text (a grader's
    name, a budget like `15m`) stays text; empty is absent."""
    if not text or not text.strip():
        return None
    if text.strip()[0] in '{["' or name == "hyperparameters":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise JobInputError(f"{name}: not valid JSON ({e.msg} at column {e.colno})") from None
    return text
