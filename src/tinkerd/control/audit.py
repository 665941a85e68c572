"""The operator's audit log: who created, deleted, published, unpublished or read (downloaded) what, and when.

Events are named `<resource>_<action>` like the hosted service's (`training_run_create`, `checkpoint_create`,
`checkpoint_delete`, `checkpoint_publish`, `checkpoint_unpublish`, `checkpoint_read`, `custom_loss_create`),
kept in the Store, and listed per UTC day (`GET /api/v1/audit`): each key sees its own events, an admin key all.
Knows the Store; not HTTP, not who is an admin (the route decides).
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone

from tinkerd.control.plane import ControlPlane
from tinkerd.protocol.paths import owner_urn
from tinkerd.protocol.types import BadRequest

EVENT_TYPES = {"all": "", "checkpoints": "checkpoint_", "projects": "project_", "teams": "team_",
               "organizations": "organization_"}


def record(st: ControlPlane, owner: str, event: str, model_id: str | None = None, tinker_path: str | None = None,
           **details) -> None:
    details = {"actor": owner_urn(owner), **({"model_id": model_id} if model_id else {}),
               **({"tinker_path": tinker_path} if tinker_path else {}), **details}
    st.store.add_audit_event(owner, event, details, model_id, tinker_path)


def entries(st: ControlPlane, owner: str | None, event_type: str = "all", day: str | None = None) -> list[dict]:
    """One UTC day's events (today by default) of `owner` (None: everyone), as AuditLogEntry JSON."""
    prefix = EVENT_TYPES.get(event_type)
    if prefix is None:
        raise BadRequest(f"event_type must be one of {', '.join(EVENT_TYPES)}, got {event_type!r}")
    try:
        when = date.fromisoformat(day) if day else datetime.now(timezone.utc).date()
    except ValueError:
        raise BadRequest(f"day must be an ISO date (YYYY-MM-DD), got {day!r}") from None
    start = datetime.combine(when, time(0), timezone.utc)
    rows = st.store.audit_events(start.timestamp(), (start + timedelta(days=1)).timestamp(), owner)
    return [{"timestamp": datetime.fromtimestamp(r["created"], timezone.utc).isoformat(), "event": r["event"],
             "event_details": r["details"] or {}, "model_id": r["model_id"], "tinker_path": r["tinker_path"]}
            for r in rows if r["event"].startswith(prefix)]
