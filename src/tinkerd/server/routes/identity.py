"""Identity routes: the token exchange the SDK makes when `client/config` turns token auth on, the key's own
metadata (`tinker auth login`), and the audit log (`AdminClient.get_audit_log`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header, HTTPException, Request

from tinkerd.control import audit
from tinkerd.control.plane import ControlPlane, NotFound
from tinkerd.server.auth import caller, check_key, token_claims, tokens
from tinkerd.server.deps import plane
from tinkerd.server.identity import ORG_ID, owner_of_key

router = APIRouter(prefix="/api/v1")


def _key_name(st: ControlPlane, owner: str) -> str | None:
    return next((name for key, name in st.config.key_names.items() if owner_of_key(key) == owner), None)


@router.post("/auth/token")
async def auth_token(request: Request, x_api_key: str | None = Header(default=None), st: ControlPlane = Depends(plane)):
    """A short-lived JWT for the raw API key in X-API-Key (a still-valid token is exchanged for a fresh one)."""
    if not st.config.token_auth:
        raise NotFound("token auth is off on this server (tinkerd serve --no-token-auth): send the API key itself")
    if x_api_key and x_api_key.startswith("eyJ"):
        owner = token_claims(request, x_api_key, st)["owner"]
    else:
        owner = check_key(x_api_key, st)
    return {"jwt": tokens(request).mint(owner, _key_name(st, owner))}


@router.get("/auth/apikey/me")
async def api_key_me(owner: str = Depends(caller), st: ControlPlane = Depends(plane)):
    """What `tinker auth login` checks: the key's name from the keys file (else its owner id), never the key."""
    return {"key_id": int(owner[:12], 16), "name": _key_name(st, owner) or owner, "note": "tinkerd API key",
            "details": {"org_details": {"name": ORG_ID}, "user_details": {"email": ""}}}


@router.get("/audit")
async def audit_log(event_type: str = "all", day: str | None = None, owner: str = Depends(caller),
                    st: ControlPlane = Depends(plane)):
    """One UTC day of events: the caller's own, or everyone's for an `--admin-key`."""
    admin = owner in {owner_of_key(k) for k in st.config.admin_keys}
    return {"entries": audit.entries(st, None if admin else owner, event_type, day)}
