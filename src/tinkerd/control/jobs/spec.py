"""What `POST /api/v1/jobs` accepts besides the data: kind, base model, grader, budget, hyperparameters.

`parse_spec` turns the request's fields into a plain dict (stored as the job's `job_spec`) or raises
`JobInputError` naming the field to fix. It checks names, types and ranges; it does not read the data file
(`files`) nor decide any number the user left out (`plan`).
"""

from __future__ import annotations

import re

from tinkerd.protocol.numbers import bounded_setting
from tinkerd.protocol.types import BadRequest

KINDS = ("sft", "dpo", "rl")
GRADERS = ("exact_match", "contains", "regex", "json_schema", "model_grader")
# Hyperparameters a user may set; every other choice is the planner's. Values: (type, low, high).
HYPERPARAMETERS = {
    "learning_rate": (float, 1e-7, 1.0), "rank": (int, 1, 128), "batch_size": (int, 1, 512),
    "eval_every": (int, 1, 10_000), "patience": (int, 1, 100), "held_out_fraction": (float, 0.01, 0.5),
    "seed": (int, 0, 2**31 - 1), "group_size": (int, 2, 64), "max_tokens": (int, 1, 4096),
    "beta": (float, 1e-4, 100.0), "epochs": (float, 0.1, 100.0), "eval_samples": (int, 1, 64),
}
MIN_MINUTES = 1.0  # a step and the two evaluations of the embedded model take well under a minute on a 2-core CPU


class JobInputError(BadRequest):
    """Bad job input, reported as 400 with this message (which names the line and field when there is one)."""


def parse_budget(budget) -> dict:
    """`"15m"`, `"90s"`, `"2h"`, `"40 steps"`, an int (steps) or `{"minutes": m, "steps": n}` ->
    {"minutes": m or None, "steps": n or None}; the job stops at whichever comes first."""
    if budget is None:
        return {"minutes": 15.0, "steps": None}
    if isinstance(budget, bool):
        raise JobInputError("budget: expected minutes ('15m') or steps ('40 steps'), got a boolean")
    if isinstance(budget, int):
        budget = {"steps": budget}
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|min|steps?)?\s*", budget)
        if not m:
            raise JobInputError(f"budget: {budget!r} is neither minutes ('15m', '90s', '2h') nor steps ('40 steps')")
        value, unit = float(m.group(1)), m.group(2) or "steps"
        budget = ({"steps": value} if unit.startswith("step") else
                  {"minutes": value * {"s": 1 / 60, "m": 1, "min": 1, "h": 60}[unit]})
    if not isinstance(budget, dict) or not set(budget) <= {"minutes", "steps"} or not budget:
        raise JobInputError("budget: expected minutes ('15m'), steps ('40 steps') or {\"minutes\": M, \"steps\": N}")
    minutes, steps = budget.get("minutes"), budget.get("steps")
    if steps is not None and (not isinstance(steps, (int, float)) or steps < 1 or steps != int(steps)):
        raise JobInputError(f"budget: steps must be a whole number of at least 1 (one step), got {steps!r}")
    if minutes is not None and (not isinstance(minutes, (int, float)) or minutes < MIN_MINUTES):
        raise JobInputError(f"budget: {minutes!r} minutes is below one step with its evaluations; give at least "
                            f"{MIN_MINUTES:g}m, or a number of steps")
    return {"minutes": None if minutes is None else float(minutes), "steps": None if steps is None else int(steps)}


def parse_grader(kind: str, grader) -> dict | None:
    """The grader of an `rl` job: a name or {"type": name, ...}. Fields: `field` (the reference column, default
    "answer"), `pattern` (regex), `schema` (json_schema), `rubric` (model_grader: a Yes/No question with
    `{reply}` and optionally `{reference}`)."""
    if kind != "rl":
        if grader is not None:
            raise JobInputError(f"grader: only rl jobs take a grader, this is a {kind} job")
        return None
    if grader is None:
        raise JobInputError(f"grader: an rl job needs one of {', '.join(GRADERS)}")
    grader = {"type": grader} if isinstance(grader, str) else grader
    if not isinstance(grader, dict) or grader.get("type") not in GRADERS:
        raise JobInputError(f"grader: unknown grader {grader!r}; use one of {', '.join(GRADERS)}")
    out = {"type": grader["type"], "field": grader.get("field", "answer")}
    unknown = set(grader) - {"type", "field", "pattern", "schema", "rubric"}
    if unknown:
        raise JobInputError(f"grader: unknown fields {sorted(unknown)}")
    if out["type"] == "regex" and "pattern" in grader:
        try:
            re.compile(grader["pattern"])
        except (re.error, TypeError) as e:
            raise JobInputError(f"grader.pattern: not a regular expression ({e})") from None
        out["pattern"] = grader["pattern"]
    if out["type"] == "json_schema":
        out["schema"] = check_schema(grader.get("schema"))
    if out["type"] == "model_grader":
        rubric = grader.get("rubric")
        if not isinstance(rubric, str) or "{reply}" not in rubric:
            raise JobInputError("grader.rubric: a model_grader needs a Yes/No question containing {reply} "
                                "(and optionally {reference})")
        out["rubric"] = rubric
    return out


def check_schema(schema) -> dict | None:
    """None: each row's reference field holds its schema (checked with the rows)."""
    if schema is None:
        return None
    import jsonschema  # only json_schema jobs need it

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except (jsonschema.SchemaError, TypeError, AttributeError) as e:
        raise JobInputError(f"grader.schema: not a valid JSON Schema ({getattr(e, 'message', e)})") from None
    return schema


def parse_hyperparameters(values) -> dict:
    values = values or {}
    if not isinstance(values, dict):
        raise JobInputError("hyperparameters: expected an object")
    out = {}
    for name, value in values.items():
        if name not in HYPERPARAMETERS:
            raise JobInputError(f"hyperparameters.{name}: unknown; settable are {', '.join(HYPERPARAMETERS)}")
        kind, low, high = HYPERPARAMETERS[name]
        out[name] = bounded_setting(value, kind, low, high, f"hyperparameters.{name}", JobInputError)
    return out


def parse_spec(kind, base_model: str, grader=None, budget=None, hyperparameters=None) -> dict:
    if kind not in KINDS:
        raise JobInputError(f"kind: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    return {"kind": kind, "base_model": base_model, "grader": parse_grader(kind, grader),
            "budget": parse_budget(budget), "hyperparameters": parse_hyperparameters(hyperparameters)}
