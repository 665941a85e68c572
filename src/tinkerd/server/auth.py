"""API keys: `X-API-Key` must be one of the configured keys (or any `tml-` key when none are set), or a token
this server minted for one (`server.identity`; the SDK sends one when `client/config` turns token auth on).

The caller's identity is the owner id derived from the key, so keys are never stored.
"""

from __future__ import annotations

from fastapi import Depends, Header, HTTPException, Request

from tinkerd.control.plane import ControlPlane
from tinkerd.server.deps import plane
from tinkerd.server.identity import Tokens, load_secret, owner_of_key

INVALID_TOKEN = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


def check_key(key: str | None, st: ControlPlane) -> str:
    """The owner id of an accepted raw API key, or 401."""
    keys = st.config.api_keys
    if not key:
        raise HTTPException(401, "missing X-API-Key header")
    if keys and key not in keys:
        raise HTTPException(401, "invalid API key")
    if not keys and not key.startswith("tml-"):
        raise HTTPException(401, "API keys start with 'tml-'")
    return owner_of_key(key)


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


async def caller(request: Request, x_api_key: str | None = Header(default=None),
                 st: ControlPlane = Depends(plane)) -> str:
    if x_api_key and x_api_key.startswith("eyJ"):
        return token_claims(request, x_api_key, st)["owner"]
    return check_key(x_api_key, st)
