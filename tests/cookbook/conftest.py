"""The cookbook smoke tests reuse the end-to-end tests' session server (a real tinkerd on the embedded model)."""

from tests.e2e.conftest import server  # noqa: F401

__all__ = ["server"]
