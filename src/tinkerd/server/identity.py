"""Who a caller is: the owner id derived from an API key, its hosted-form URN, and short-lived tokens.

An owner id is the first 24 hex digits of the key's SHA-256 (the Store keeps only that, never a
key); it is shown as `tml:organization_user:<id>` like the hosted service's user URNs. With token
auth on (`client/config` says `pjwt_auth_enabled`), the SDK exchanges its key once at
`POST /api/v1/auth/token` for a JWT (HS256, signed with a secret kept in the data dir so tokens survive
a restart) carrying `sub` (the URN), `owner`, `org_id`, `name` (the key's name from the keys file), `iat`
and `exp`; it sends that token as its X-API-Key afterwards and `RestClient.whoami` reads its claims.
A token whose key is no longer accepted, a bad signature or an expired token is refused (401
invalid_token, which makes the SDK exchange its key again). Knows no routes and no Store.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path

from tinkerd.protocol.paths import owner_urn

ORG_ID = "self-hosted"
TOKEN_SECONDS = 3600


def owner_of_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_secret(data_dir: Path) -> bytes:
    """The signing secret of this data dir (32 random bytes, created once, readable by the owner only)."""
    path = Path(data_dir) / "auth-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        os.replace(tmp, path)
    return path.read_bytes()


class Tokens:
    def __init__(self, secret: bytes, lifetime: float = TOKEN_SECONDS) -> None:
        self._secret, self.lifetime = secret, lifetime

    def _sign(self, signing_input: str) -> str:
        return _b64(hmac.new(self._secret, signing_input.encode(), hashlib.sha256).digest())

    def mint(self, owner: str, name: str | None, now: float | None = None) -> str:
        now = time.time() if now is None else now
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        claims = {"sub": owner_urn(owner), "owner": owner, "org_id": ORG_ID, "name": name, "iss": "tinkerd",
                  "iat": int(now), "exp": int(now + self.lifetime)}
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{header}.{payload}.{self._sign(header + '.' + payload)}"

    def verify(self, token: str, now: float | None = None) -> dict | None:
        """The claims of a token this server signed and that has not expired; else None."""
        parts = token.split(".")
        if len(parts) != 3 or not hmac.compare_digest(self._sign(parts[0] + "." + parts[1]), parts[2]):
            return None
        try:
            claims = json.loads(_unb64(parts[1]))
        except ValueError:
            return None
        now = time.time() if now is None else now
        if not isinstance(claims, dict) or not isinstance(claims.get("owner"), str) \
                or not isinstance(claims.get("exp"), (int, float)) or claims["exp"] <= now:
            return None
        return claims
