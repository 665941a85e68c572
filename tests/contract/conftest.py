"""One engine per implementation and test module (the Ray one costs an actor start)."""

from __future__ import annotations

import pytest

from tests.contract.implementations import IMPLEMENTATIONS, MARKS


@pytest.fixture(scope="module", params=[pytest.param(name, marks=MARKS.get(name, [])) for name in IMPLEMENTATIONS])
def engine(request):
    built = IMPLEMENTATIONS[request.param]("tiny")
    yield built
    built.close()
