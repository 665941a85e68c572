"""Sign in with an API key (a form; the key goes into an HttpOnly, SameSite=Strict cookie) and sign out.

A sign-in posted from another site's page (its `Origin` names another host than `Host`) is refused, so no page elsewhere
can sign a visitor in under its own key; sign-out needs the page's CSRF token.

`viewer` is what every page depends on: the signed-in key and its owner id, or `SignInRequired`, which
the app answers with a redirect to the sign-in page.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import RedirectResponse

from tinkerd.control.plane import ControlPlane
from tinkerd.server.auth import KEY_COOKIE, csrf_token, identity, key_problem
from tinkerd.server.console.render import render
from tinkerd.server.deps import plane

router = APIRouter(include_in_schema=False)
COOKIE_SECONDS = 30 * 86400


class SignInRequired(Exception):
    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


@dataclass
class Viewer:
    key: str
    owner: str
    csrf: str


async def viewer(request: Request, st: ControlPlane = Depends(plane)) -> Viewer:
    key = request.cookies.get(KEY_COOKIE)
    if key_problem(key, st.config.api_keys, "cookie"):
        raise SignInRequired(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    return Viewer(key, identity(key), csrf_token(request, key))


def _safe_next(url: str | None) -> str:
    """Only a path on this server (no `//host`), so the form cannot bounce a user elsewhere."""
    return url if url and url.startswith("/") and not url.startswith("//") else "/"


def sign_in_redirect(next_url: str) -> RedirectResponse:
    return RedirectResponse(f"/signin?next={quote(next_url, safe='')}", status_code=303)


@router.get("/signin")
def sign_in_page(request: Request, next: str = "/"):
    return render(request, "signin.html", None, next=_safe_next(next), error=None)


@router.post("/signin")
async def sign_in(request: Request, st: ControlPlane = Depends(plane)):
    origin = request.headers.get("origin")
    if origin and urlsplit(origin).netloc != request.headers.get("host"):  # another site signing you in as them
        raise HTTPException(403, "sign in from this server's own page")
    form = {k: v[0] for k, v in parse_qs((await request.body()).decode(errors="replace")).items()}
    key, next_url = form.get("api_key", "").strip(), _safe_next(form.get("next"))
    problem = key_problem(key, st.config.api_keys, "API key")
    if problem:
        return render(request, "signin.html", None, status_code=401, next=next_url,
                      error=f"That key was refused: {problem}.")
    response = RedirectResponse(next_url, status_code=303)
    response.set_cookie(KEY_COOKIE, key, max_age=COOKIE_SECONDS, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/")
    return response


@router.post("/signout")
async def sign_out(request: Request, who: Viewer = Depends(viewer)):
    form = parse_qs((await request.body()).decode(errors="replace"))
    if form.get("csrf", [""])[0] != who.csrf:
        raise HTTPException(403, "missing or stale CSRF token: reload the page and try again")
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie(KEY_COOKIE, path="/")
    return response
