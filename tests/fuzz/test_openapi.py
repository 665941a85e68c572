"""Schemathesis over the app's own OpenAPI spec, in-process: every operation gets generated requests
(valid by the schema and not), sent through one TestClient whose app keeps running between them."""

from __future__ import annotations

import json

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from tests.fuzz.conftest import KEY, check_reply
from tests.fuzz.app import APP, started

SCHEMA = schemathesis.openapi.from_dict(APP.openapi())
EXAMPLES_PER_OPERATION = 35


@SCHEMA.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_operation_answers_5xx(case):
    client: TestClient = started()
    kwargs = case.as_transport_kwargs(base_url=str(client.base_url), headers=KEY)
    if "data" in kwargs and isinstance(kwargs["data"], (bytes, str)):
        kwargs["content"] = kwargs.pop("data")
    kwargs.pop("cookies", None)
    if kwargs.get("files"):
        kwargs["files"] = sendable(kwargs["files"])
    check_reply(client.request(**kwargs))


def sendable(files: list) -> list:
    """Multipart parts as a wire carries them, text or bytes: schemathesis may make a number of an extra form field,
    which httpx refuses to encode only while the app already reads the body (a 500 of the test client, not the app)."""
    return [(name, (part[0], part[1] if isinstance(part[1], (str, bytes)) else json.dumps(part[1]), *part[2:]))
            for name, part in files]
