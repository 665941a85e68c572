"""A job's data file: JSONL, one example per line, checked whole before any compute.

`read_rows(kind, text, grader, context)` returns the rows normalised to one shape per kind (what the runner
trains on) or raises `JobInputError` naming the first bad line and field:

- sft: `{"messages": [...]}` (OpenAI chat; the last message is the assistant reply learned, the ones before are
  the prompt) or `{"prompt": str, "completion": str}` (the prompt becomes the user turn) ->
  `{"messages": prompt messages, "completion": str}`;
- dpo: `{"prompt": str or "messages": [...], "chosen": str, "rejected": str}` -> `{"messages", "chosen", "rejected"}`;
- rl: `{"prompt": str or "messages": [...], <grader field>: reference}` -> `{"messages", "reference"}`.

Rows longer than the model's context are counted with the base model's own `tokenizer.json` from the local
Hugging Face cache (the `tokenizers` library: no torch, no chat template, so a few tokens per message are added
as the template's share); without that file the length check is skipped. Knows nothing about how rows are split
or trained on (`plan`, `tinkerd.jobs`).
"""

from __future__ import annotations

import json
import re

from tinkerd.control.jobs.spec import JobInputError, check_schema

MIN_HELD_OUT, MIN_TRAIN = 20, 20  # the held-out split has at least 20 rows, and so must training
ROLES = ("system", "user", "assistant")
TEMPLATE_TOKENS_PER_MESSAGE = 6  # SmolLM2's "<|im_start|>role\n ... <|im_end|>\n" is 5; one spare


def read_rows(kind: str, text: str, grader: dict | None = None, tokenizer=None,
              context: int | None = None) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise JobInputError(f"line {number}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(raw, dict):
            raise JobInputError(f"line {number}: expected a JSON object, got {type(raw).__name__}")
        try:
            row = NORMALISE[kind](raw, grader)
        except JobInputError as e:
            raise JobInputError(f"line {number}, field {e}") from None
        if tokenizer is not None and context is not None:
            n = count_tokens(tokenizer, row)
            if n > context:
                raise JobInputError(f"line {number}: about {n} tokens, longer than the model's context of {context}; "
                                    "shorten or drop it")
        rows.append(row)
    if len(rows) < MIN_HELD_OUT + MIN_TRAIN:
        what = "the file is empty" if not rows else f"the file has {len(rows)} rows"
        raise JobInputError(f"{what}; a job needs at least {MIN_HELD_OUT + MIN_TRAIN} ({MIN_HELD_OUT} held out to "
                            f"measure it, {MIN_TRAIN} to train on)")
    return rows


def _text(raw: dict, name: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value.strip():
        raise JobInputError(f"'{name}': expected a non-empty string, got {_show(value)}")
    return value


def _show(value) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {json.dumps(value)[:40]}"


def _messages(raw: dict, last_role: str) -> list[dict]:
    msgs = raw.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise JobInputError(f"'messages': expected a non-empty list of {{role, content}}, got {_show(msgs)}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise JobInputError(f"'messages[{i}].role': expected one of {', '.join(ROLES)}, got "
                                f"{_show(m.get('role') if isinstance(m, dict) else m)}")
        if not isinstance(m.get("content"), str):
            raise JobInputError(f"'messages[{i}].content': expected a string, got {_show(m.get('content'))}")
    if msgs[-1]["role"] != last_role:
        raise JobInputError(f"'messages[{len(msgs) - 1}].role': the last message must be the {last_role}'s, "
                            f"got {msgs[-1]['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _prompt(raw: dict) -> list[dict]:
    """`prompt` (a string: the user turn) or `messages` ending with the user's turn."""
    if "messages" in raw:
        return _messages(raw, "user")
    if "prompt" not in raw:
        raise JobInputError("'prompt': missing (give 'prompt' or 'messages')")
    return [{"role": "user", "content": _text(raw, "prompt")}]


def _sft(raw: dict, grader) -> dict:
    if "messages" in raw:
        msgs = _messages(raw, "assistant")
        if len(msgs) < 2:
            raise JobInputError("'messages': needs a prompt before the assistant's reply")
        return {"messages": msgs[:-1], "completion": msgs[-1]["content"]}
    if "prompt" not in raw and "completion" not in raw:
        raise JobInputError("'messages': missing (give 'messages', or 'prompt' and 'completion')")
    return {"messages": [{"role": "user", "content": _text(raw, "prompt")}], "completion": _text(raw, "completion")}


def _dpo(raw: dict, grader) -> dict:
    row = {"messages": _prompt(raw), "chosen": _text(raw, "chosen"), "rejected": _text(raw, "rejected")}
    if row["chosen"] == row["rejected"]:
        raise JobInputError("'rejected': the same text as 'chosen', so there is nothing to prefer")
    return row


def _rl(raw: dict, grader: dict) -> dict:
    field = grader["field"]
    needs_reference = grader["type"] in ("exact_match", "contains") or (
        grader["type"] == "regex" and "pattern" not in grader) or (
        grader["type"] == "json_schema" and grader.get("schema") is None)
    reference = raw.get(field)
    if needs_reference and reference is None:
        raise JobInputError(f"'{field}': missing; the {grader['type']} grader compares each reply with it")
    if grader["type"] in ("exact_match", "contains", "regex") and reference is not None:
        if not isinstance(reference, (str, int, float)) or isinstance(reference, bool):
            raise JobInputError(f"'{field}': expected a string or number, got {_show(reference)}")
        reference = str(reference)
    if grader["type"] == "regex" and "pattern" not in grader:
        try:
            re.compile(reference)
        except re.error as e:
            raise JobInputError(f"'{field}': not a regular expression ({e})") from None
    if grader["type"] == "json_schema" and grader.get("schema") is None:
        try:
            check_schema(reference)
        except JobInputError as e:
            raise JobInputError(f"'{field}': {str(e).split(': ', 1)[1]}") from None
    return {"messages": _prompt(raw), "reference": reference}


NORMALISE = {"sft": _sft, "dpo": _dpo, "rl": _rl}


def count_tokens(tokenizer, row: dict) -> int:
    texts = [m["content"] for m in row["messages"]] + [row[k] for k in ("completion", "chosen", "rejected") if k in row]
    return sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)) + \
        TEMPLATE_TOKENS_PER_MESSAGE * len(texts)


def cached_tokenizer(tokenizer_id: str):
    """The base model's fast tokenizer from the local Hugging Face cache (tinkerd writes it there at start), or
    None when it is not there."""
    try:
        from huggingface_hub import try_to_load_from_cache
        from tokenizers import Tokenizer
    except ImportError:
        return None
    path = try_to_load_from_cache(tokenizer_id, "tokenizer.json")
    return Tokenizer.from_file(path) if isinstance(path, str) else None
