"""The rl job graders: a reply (and the row's reference) -> a reward in [0, 1]; a reply passes at > 0.5.

Rule graders are plain Python: `exact_match` (case, surrounding space, quotes and a final full stop ignored),
`contains` (the reference appears in the reply, case ignored), `regex` (`re.search` of the grader's pattern, or
the row's reference as the pattern: anchor it with ^...$ for a whole-reply match), `json_schema` (the reply,
without a ``` fence, parses as JSON and validates against the grader's schema or the row's). `model_grader` asks
a model served by the same tinkerd a Yes/No rubric and takes P(Yes), as cookbook/rl_grader does. Knows the spec
`control.jobs.spec` checked, not how rewards are used.
"""

from __future__ import annotations

import json
import re

from cookbook.common import messages, prompt_tokens, yes_probability


def _norm(text: str) -> str:
    return " ".join(text.strip().strip("\"'").rstrip(".").split()).casefold()


def _json_reply(reply: str):
    text = reply.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.S)
    return json.loads(fenced.group(1) if fenced else text)


def rule_reward(grader: dict, reply: str, reference) -> float:
    kind = grader["type"]
    if kind == "exact_match":
        return float(_norm(reply) == _norm(str(reference)))
    if kind == "contains":
        return float(_norm(str(reference)) in _norm(reply))
    if kind == "regex":
        return float(re.search(grader.get("pattern") or str(reference), reply) is not None)
    if kind == "json_schema":
        import jsonschema
        try:
            jsonschema.validate(_json_reply(reply), grader.get("schema") or reference)
        except (ValueError, jsonschema.ValidationError):
            return 0.0
        return 1.0
    raise ValueError(f"not a rule grader: {kind}")


class Grader:
    """Grades replies in batches; a model grader samples the base model (one sampling client, made once)."""

    def __init__(self, spec: dict, service, base_model: str, tokenizer) -> None:
        self.spec, self.tokenizer = spec, tokenizer
        self.model = (service.create_sampling_client(base_model=base_model).result()
                      if spec["type"] == "model_grader" else None)

    def rewards(self, replies: list[str], references: list) -> list[float]:
        if self.model is None:
            return [rule_reward(self.spec, r, ref) for r, ref in zip(replies, references)]
        questions = [self.spec["rubric"].replace("{reply}", r).replace("{reference}", "" if ref is None else str(ref))
                     for r, ref in zip(replies, references)]
        prompts = [prompt_tokens(self.tokenizer, messages(q)) for q in questions]
        return yes_probability(self.model, self.tokenizer, prompts)
