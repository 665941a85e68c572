"""Schemathesis over the app's own OpenAPI spec, in-process: every operation gets generated requests
(valid by the schema and not), sent through one TestClient whose app keeps running between them."""

from __future__ import annotations

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
    check_reply(client.request(**kwargs))
