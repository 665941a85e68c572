"""API keys: `X-API-Key` (the SDK) or `Authorization: Bearer` (OpenAI clients) must be one of the configured
keys, or any `tml-` key when none are set.

The caller's identity is a hash of the key, so keys are never stored, and both headers name the same
caller. The OpenAI routes answer a refused key in OpenAI's error shape (`bearer_caller`).
"""

from __future__ import annotations

import hashlib

from fastapi import Depends, Header, HTTPException

from tinkerd.control.openai_requests import OpenAIError
from tinkerd.control.plane import ControlPlane
from tinkerd.server.deps import plane


def key_problem(key: str | None, keys: frozenset[str], header: str) -> str | None:
    """Why `key` is refused, or None."""
    if not key:
        return f"missing {header} header"
    if keys and key not in keys:
        return "invalid API key"
    if not keys and not key.startswith("tml-"):
        return "API keys start with 'tml-'"
    return None


def identity(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24]


async def caller(x_api_key: str | None = Header(default=None), st: ControlPlane = Depends(plane)) -> str:
    problem = key_problem(x_api_key, st.config.api_keys, "X-API-Key")
    if problem:
        raise HTTPException(401, problem)
    return identity(x_api_key)


async def bearer_caller(authorization: str | None = Header(default=None), x_api_key: str | None = Header(default=None),
                        st: ControlPlane = Depends(plane)) -> str:
    """`Authorization: Bearer <key>` (or the SDK's `X-API-Key`), refused with a 401 in OpenAI's shape."""
    scheme, _, token = (authorization or "").partition(" ")
    key = token.strip() if scheme.lower() == "bearer" else x_api_key
    problem = key_problem(key, st.config.api_keys, "Authorization: Bearer")
    if problem:
        raise OpenAIError(401, problem, code="invalid_api_key")
    return identity(key)
