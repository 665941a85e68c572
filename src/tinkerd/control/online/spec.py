"""What `POST /api/v1/online` and `POST /api/v1/online/NAME/feedback` accept, checked field by field.

`parse_create` returns the online model's name, base, source checkpoint and settings (every setting the caller
left out takes its default from `DEFAULTS`); `parse_feedback` returns the feedback's kind and its plain-JSON form
(what the Store keeps). Both raise `BadRequest` (400) naming the field to fix. Knows names, types and ranges;
not the Store, the tokenizer nor how feedback is learned (`examples`, `learner`).
"""

from __future__ import annotations

import re

from tinkerd.protocol.numbers import bounded_setting
from tinkerd.protocol.paths import PREFIX
from tinkerd.protocol.types import BadRequest

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# The learning settings, measured on SmolLM2-135M-Instruct on a 2-core CPU (docs/online.md): one correction is
# recalled on paraphrases after one update of `steps` steps at `learning_rate`, while the held-out probe's NLL stays
# within the bound the doc states. Values: (default, type, low, high).
SETTINGS = {
    "rank": (16, int, 1, 128),
    "train_unembed": (True, bool, False, True),  # a LoRA on the output embedding too (see docs/online.md)
    "learning_rate": (1e-3, float, 1e-7, 1e-1),
    "steps": (6, int, 1, 64),  # optimizer steps per update, at most
    "stop_nll": (0.1, float, 0.0, 10.0),  # an update stops once its new corrections' reply NLL is below this; 0: off
    "max_new": (8, int, 1, 64),  # new pieces of feedback one update takes (the rest wait for the next)
    "replay": (8, int, 0, 64),  # earlier pieces of feedback replayed in every step
    "anchors": (48, int, 0, 64),  # general prompts whose base answers, sampled at creation, are replayed
    "probe_prompts": (8, int, 0, 8),  # held-out general prompts whose base answers are the retention probe
    "anchors_per_step": (4, int, 0, 64),
    "anchor_weight": (0.5, float, 0.0, 100.0),
    "anchor_max_tokens": (48, int, 1, 512),
    "dpo_beta": (0.5, float, 1e-3, 100.0),
    "seed": (0, int, 0, 2**31 - 1),
}
DEFAULTS = {name: spec[0] for name, spec in SETTINGS.items()}
KINDS = ("correction", "preference", "rating")
ROLES = ("system", "user", "assistant")
MAX_TEXT = 32_000


def parse_settings(values) -> dict:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise BadRequest("settings: expected an object")
    out = dict(DEFAULTS)
    for name, value in values.items():
        if name not in SETTINGS:
            raise BadRequest(f"settings.{name}: unknown; settable are {', '.join(SETTINGS)}")
        _, kind, low, high = SETTINGS[name]
        if kind is bool:
            if not isinstance(value, bool):
                raise BadRequest(f"settings.{name}: expected true or false, got {value!r}")
            out[name] = value
            continue
        out[name] = bounded_setting(value, kind, low, high, f"settings.{name}")
    return out


def parse_create(body: dict, served: list[str]) -> tuple[str, str | None, str | None, dict]:
    """(name, base_model or None, source checkpoint path or None, settings). `base_model` may be a served base
    model's name or a tinker:// checkpoint; neither given: the first served base model."""
    name = body.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise BadRequest(f"name: expected 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit), "
                         f"got {name!r}")
    if name in served:
        raise BadRequest(f"name: {name!r} is a base model's name; choose another")
    base = body.get("base_model")
    if base is not None and not isinstance(base, str):
        raise BadRequest("base_model: expected a base model's name or a tinker:// checkpoint path")
    settings = dict(body.get("settings") or {})
    if body.get("rank") is not None:
        settings["rank"] = body["rank"]
    if base is not None and base.startswith(PREFIX):
        return name, None, base, parse_settings(settings)
    if base is not None and base not in served:
        raise BadRequest(f"base_model: {base!r} is not served here; served: {served}")
    return name, base or served[0], None, parse_settings(settings)


def _text(value, field: str, required: bool = True) -> str:
    if not isinstance(value, str) or (required and not value.strip()):
        raise BadRequest(f"{field}: expected a non-empty string")
    if len(value) > MAX_TEXT:
        raise BadRequest(f"{field}: {len(value)} characters is over the limit of {MAX_TEXT}")
    return value


def parse_messages(messages, field: str = "messages") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest(f"{field}: required: a non-empty list of {{role, content}} messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"{field}[{i}]: expected an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise BadRequest(f"{field}[{i}].role: expected one of {list(ROLES)}, got {role!r}")
        out.append({"role": role, "content": _text(message.get("content"), f"{field}[{i}].content", required=False)})
    if out[-1]["role"] == "assistant":
        raise BadRequest(f"{field}[{len(out) - 1}].role: the conversation must end before the reply being judged "
                         "(the last message cannot be the assistant's)")
    return out


def parse_feedback(body: dict) -> tuple[str, dict]:
    """(kind, feedback): exactly one of `correction` (a corrected assistant reply), `preferred` + `rejected`
    (a preference), or `rating` (a number in [-1, 1]) of `reply`."""
    messages = parse_messages(body.get("messages"))
    given = [k for k in ("correction", "preferred", "rejected", "rating") if body.get(k) is not None]
    if not given:
        raise BadRequest("correction: feedback needs one of correction, preferred + rejected, or rating + reply")
    if "correction" in given:
        if len(given) > 1:
            raise BadRequest(f"{given[1]}: give exactly one kind of feedback; correction is given already")
        return "correction", {"messages": messages, "correction": _text(body["correction"], "correction")}
    if "preferred" in given or "rejected" in given:
        if "rating" in given:
            raise BadRequest("rating: give exactly one kind of feedback; preferred/rejected is given already")
        preferred = _text(body.get("preferred"), "preferred")
        rejected = _text(body.get("rejected"), "rejected")
        if preferred == rejected:
            raise BadRequest("rejected: must differ from preferred")
        return "preference", {"messages": messages, "preferred": preferred, "rejected": rejected}
    rating = body["rating"]
    if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not -1.0 <= rating <= 1.0:
        raise BadRequest(f"rating: expected a number in [-1, 1], got {rating!r}")
    return "rating", {"messages": messages, "reply": _text(body.get("reply"), "reply"), "rating": float(rating)}
