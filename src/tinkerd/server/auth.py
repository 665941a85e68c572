"""API keys: `X-API-Key` (the SDK) or `Authorization: Bearer` (OpenAI clients) must be one of the configured
keys, or any `tml-` key when none are set.

The caller's identity is a hash of the key, so keys are never stored, and both headers name the same
caller (the files and jobs routes take either: `key_or_bearer_caller`). The OpenAI routes answer a refused key in OpenAI's error shape (`bearer_caller`).

With token auth on (`client/config`), the SDK sends a token this server minted for its key instead
(`server.identity`); a forged, expired or no-longer-accepted one is a 401 `invalid_token`, which makes
the SDK exchange its key again.

The console signs in with the same key, kept in an HttpOnly, SameSite=Strict cookie (`KEY_COOKIE`); a
request without a key header falls back to that cookie, and if it writes (any method but GET/HEAD) it must
also carry the page's CSRF token in `X-CSRF-Token` (`csrf_token`: an HMAC of the key under a secret of this
process, so a token from before a restart is refused and the page must be reloaded).

A job's runner presents its job token (`tml-job-...`, `control.jobs.manager`) as its key and acts as the job's
owner while the job runs (its SDK may exchange it for a token of that owner; the job's report route still takes
only the live job token, which fences off a runner of an earlier start).
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Depends, Header, HTTPException, Request

from tinkerd.control.jobs.manager import TOKEN_PREFIX, token_hash
from tinkerd.control.openai_requests import OpenAIError
from tinkerd.control.plane import ControlPlane
from tinkerd.server.deps import plane
from tinkerd.server.identity import Tokens, load_secret, owner_of_key

INVALID_TOKEN = {"WWW-Authenticate": 'Bearer error="invalid_token"'}

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
    return owner_of_key(key)


def check_key(key: str | None, st: ControlPlane) -> str:
    """The owner id of an accepted raw API key (a live job token: its job's owner), or 401."""
    if key and key.startswith(TOKEN_PREFIX):  # a job's runner (`control.jobs.manager`)
        job = st.store.job_for_token(token_hash(key))
        if job is None:
            raise HTTPException(401, "this job token is not (or no longer) valid")
        return job["owner"]
    problem = key_problem(key, st.config.api_keys, "X-API-Key")
    if problem:
        raise HTTPException(401, problem)
    return identity(key)


def tokens(request: Request) -> Tokens:
    """This app's token signer (its secret lives in the data dir, created on first use)."""
    app_state = request.app.state
    if getattr(app_state, "tokens", None) is None:
        app_state.tokens = Tokens(load_secret(app_state.tinkerd.config.data_dir))
    return app_state.tokens


def token_claims(request: Request, token: str, st: ControlPlane) -> dict:
    claims = tokens(request).verify(token)
    keys = st.config.api_keys
    if claims is None or (keys and claims["owner"] not in {owner_of_key(k) for k in keys}):
        raise HTTPException(401, "invalid or expired token: exchange the API key again", headers=INVALID_TOKEN)
    return claims


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
    if x_api_key and x_api_key.startswith("eyJ"):
        return token_claims(request, x_api_key, st)["owner"]
    return check_key(key_of(request, x_api_key), st)


async def key_or_bearer_caller(request: Request, x_api_key: str | None = Header(default=None),
                               authorization: str | None = Header(default=None),
                               st: ControlPlane = Depends(plane)) -> str:
    """`caller`, also taking the key as `Authorization: Bearer <key>` (OpenAI clients and curl users of the files
    and jobs routes), refused in this API's shape (`{"detail"}`)."""
    scheme, _, token = (authorization or "").partition(" ")
    if not x_api_key and scheme.lower() == "bearer" and token.strip():
        x_api_key = token.strip()
    return await caller(request, x_api_key, st)


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
