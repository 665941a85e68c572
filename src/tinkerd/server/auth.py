"""API keys: `X-API-Key` (the SDK) or `Authorization: Bearer` (OpenAI clients) must be one of the configured
keys, or any `tml-` key when none are set.

The caller's identity is a hash of the key, so keys are never stored, and both headers name the same
caller. The OpenAI routes answer a refused key in OpenAI's error shape (`bearer_caller`).

The console signs in with the same key, kept in an HttpOnly, SameSite=Strict cookie (`KEY_COOKIE`); a
request without a key header falls back to that cookie, and if it writes (any method but GET/HEAD) it must
also carry the page's CSRF token in `X-CSRF-Token` (`csrf_token`: an HMAC of the key under a secret of this
process, so a token from before a restart is refused and the page must be reloaded).
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Depends, Header, HTTPException, Request

from tinkerd.control.openai_requests import OpenAIError
from tinkerd.control.plane import ControlPlane
from tinkerd.server.deps import plane

KEY_COOKIE = "tinkerd_key"
SAFE_METHODS = ("GET", "HEAD")


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


def csrf_token(request: Request, key: str) -> str:
    return hmac.new(request.app.state.csrf_secret, key.encode(), hashlib.sha256).hexdigest()[:32]


def key_of(request: Request, header_key: str | None) -> str | None:
    """The request's API key: the header's, else the console's cookie (with a CSRF token on writes)."""
    if header_key or KEY_COOKIE not in request.cookies:
        return header_key
    key = request.cookies[KEY_COOKIE]
    if request.method not in SAFE_METHODS:
        sent = request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(sent, csrf_token(request, key)):
            raise HTTPException(403, "missing or stale CSRF token: reload the page and try again")
    return key


async def caller(request: Request, x_api_key: str | None = Header(default=None),
                 st: ControlPlane = Depends(plane)) -> str:
    key = key_of(request, x_api_key)
    problem = key_problem(key, st.config.api_keys, "X-API-Key")
    if problem:
        raise HTTPException(401, problem)
    return identity(key)


async def bearer_caller(request: Request, authorization: str | None = Header(default=None),
                        x_api_key: str | None = Header(default=None), st: ControlPlane = Depends(plane)) -> str:
    """`Authorization: Bearer <key>` (or the SDK's `X-API-Key`, or the console's cookie), refused with a 401 in
    OpenAI's shape."""
    scheme, _, token = (authorization or "").partition(" ")
    key = key_of(request, token.strip() if scheme.lower() == "bearer" else x_api_key)
    problem = key_problem(key, st.config.api_keys, "Authorization: Bearer")
    if problem:
        raise OpenAIError(401, problem, code="invalid_api_key")
    return identity(key)
