"""Renders a console template with what every page needs (the viewer, its CSRF token, the nav)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from fastapi import Request
from fastapi.templating import Jinja2Templates

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


def _when(value) -> str:
    """An ISO time or Unix seconds as 'YYYY-MM-DD HH:MM:SS UTC'; '' for none."""
    if value in (None, ""):
        return ""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else datetime.fromtimestamp(value, timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _short(value) -> str:
    """The same time as 'Dec 03 13:57' (UTC), for tables."""
    full = _when(value)
    return datetime.strptime(full, "%Y-%m-%d %H:%M:%S UTC").strftime("%b %d %H:%M") if full else ""


def _size(n) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _num(value) -> str:
    """A metric for a table: four significant digits; '–' for none."""
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


templates.env.filters.update(when=_when, short=_short, size=_size, num=_num)


def render(request: Request, name: str, who, status_code: int = 200, **context):
    return templates.TemplateResponse(request, name, {"who": who, **context}, status_code=status_code)
