"""API keys: `X-API-Key` must be one of the configured keys, or any `tml-` key when none are set.

The caller's identity is a hash of the key, so keys are never stored. The console signs in with the
same key, kept in an HttpOnly, SameSite=Strict cookie (`KEY_COOKIE`); a request that authenticates
by that cookie and writes (any method but GET/HEAD) must also carry the page's CSRF token in
`X-CSRF-Token` (`csrf_token`: an HMAC of the key under a secret of this process, so a token from
before a restart is refused and the page must be reloaded).
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Depends, Header, HTTPException, Request

from tinkerd.control.plane import ControlPlane
from tinkerd.server.deps import plane

KEY_COOKIE = "tinkerd_key"
SAFE_METHODS = ("GET", "HEAD")


def identity(st: ControlPlane, key: str | None) -> str:
    """The owner id of an API key; 401 with the reason for a missing or wrong one."""
    keys = st.config.api_keys
    if not key:
        raise HTTPException(401, "missing X-API-Key header")
    if keys and key not in keys:
        raise HTTPException(401, "invalid API key")
    if not keys and not key.startswith("tml-"):
        raise HTTPException(401, "API keys start with 'tml-'")
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def csrf_token(request: Request, key: str) -> str:
    return hmac.new(request.app.state.csrf_secret, key.encode(), hashlib.sha256).hexdigest()[:32]


def key_of(request: Request, x_api_key: str | None) -> str | None:
    """The request's API key: the header, else the console's cookie (checked for a CSRF token on writes)."""
    if x_api_key or KEY_COOKIE not in request.cookies:
        return x_api_key
    key = request.cookies[KEY_COOKIE]
    if request.method not in SAFE_METHODS:
        sent = request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(sent, csrf_token(request, key)):
            raise HTTPException(403, "missing or stale CSRF token: reload the page and try again")
    return key


async def caller(request: Request, x_api_key: str | None = Header(default=None),
                 st: ControlPlane = Depends(plane)) -> str:
    return identity(st, key_of(request, x_api_key))
