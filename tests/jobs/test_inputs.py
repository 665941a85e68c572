"""A job's request and data file are checked whole before any compute; the planner's choices; the rule graders."""

from __future__ import annotations

import json

import pytest

from tinkerd.control.jobs.files import cached_tokenizer, read_rows
from tinkerd.control.jobs.plan import batch_indices, held_out_split, lora_learning_rate, make_plan
from tinkerd.control.jobs.spec import JobInputError, parse_spec
from tinkerd.jobs.graders import rule_reward
from tests.jobs.files import RL_GRADER, dpo_rows, jsonl, rl_rows, sft_rows

EMBEDDED_TOKENIZER = "HuggingFaceTB/SmolLM2-135M-Instruct"


def error(kind: str, text: str, grader=None, **kw) -> str:
    with pytest.raises(JobInputError) as e:
        read_rows(kind, text, grader, **kw)
    return str(e.value)


def test_the_first_bad_line_is_named_with_its_field():
    assert error("sft", jsonl(sft_rows(2)) + "{oops\n") == (
        "line 3: not valid JSON (Expecting property name enclosed in double quotes, column 2)")
    bad_role = '{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    assert error("sft", jsonl(sft_rows(4)) + bad_role) == (
        "line 5, field 'messages[0].role': expected one of system, user, assistant, got str \"robot\"")
    assert "line 2, field 'rejected'" in error("dpo", jsonl(dpo_rows(1)) + '{"prompt": "q", "chosen": "a"}\n')
    assert "line 1, field 'answer': missing" in error("rl", '{"prompt": "2+2?"}\n', {"type": "exact_match",
                                                                                     "field": "answer"})
    assert "line 1: expected a JSON object" in error("sft", "[1, 2]\n")


def test_empty_and_too_small_files_say_how_many_rows_are_needed():
    assert error("sft", "") == "the file is empty; a job needs at least 40 (20 held out to measure it, 20 to train on)"
    assert error("dpo", jsonl(dpo_rows(39))).startswith("the file has 39 rows")


def test_a_row_longer_than_the_context_is_named():
    tokenizer = cached_tokenizer(EMBEDDED_TOKENIZER)
    if tokenizer is None:
        pytest.skip("the embedded model's tokenizer is not in the local HF cache (tinkerd serve writes it)")
    rows = sft_rows(45)
    rows[7]["messages"][1]["content"] = "word " * 300
    message = error("sft", jsonl(rows), tokenizer=tokenizer, context=256)
    assert message.startswith("line 8: about ") and "longer than the model's context of 256" in message
    assert len(read_rows("sft", jsonl(sft_rows(45)), tokenizer=tokenizer, context=256)) == 45


@pytest.mark.parametrize("fields, message", [
    (dict(kind="ppo"), "kind: unknown kind 'ppo'"),
    (dict(kind="rl", grader="vibes"), "grader: unknown grader"),
    (dict(kind="rl"), "grader: an rl job needs one of"),
    (dict(kind="rl", grader={"type": "regex", "pattern": "("}), "grader.pattern: not a regular expression"),
    (dict(kind="rl", grader={"type": "json_schema", "schema": {"type": 5}}), "grader.schema: not a valid JSON Schema"),
    (dict(kind="rl", grader={"type": "model_grader", "rubric": "Good?"}), "grader.rubric: a model_grader needs"),
    (dict(kind="sft", budget="0 steps"), "budget: steps must be a whole number of at least 1"),
    (dict(kind="sft", budget="10s"), "below one step"),
    (dict(kind="sft", budget="soon"), "budget: 'soon' is neither"),
    (dict(kind="sft", hyperparameters={"lr": 1}), "hyperparameters.lr: unknown"),
    (dict(kind="sft", hyperparameters={"rank": 0}), "hyperparameters.rank: 0 is outside"),
])
def test_bad_request_fields_are_named(fields, message):
    with pytest.raises(JobInputError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_spec(base_model="m", **fields)


def test_budgets_read_as_minutes_or_steps():
    assert parse_spec("sft", "m", budget="2h")["budget"] == {"minutes": 120.0, "steps": None}
    assert parse_spec("sft", "m", budget="40 steps")["budget"] == {"minutes": None, "steps": 40}
    assert parse_spec("sft", "m", budget={"minutes": 5, "steps": 9})["budget"] == {"minutes": 5.0, "steps": 9}


def test_the_plan_follows_its_rules():
    assert lora_learning_rate(576, "sft") == pytest.approx(1.32e-3, rel=0.01)  # SmolLM2-135M, cookbook sft's 1e-3
    train, held = held_out_split(100, seed=0)
    assert len(held) == 20 and not set(train) & set(held) and len(train) == 80  # 10 %, but at least 20
    assert len(held_out_split(1000, seed=0)[1]) == 100
    plan = make_plan("dpo", 80, 20, 128.0, 576, {"minutes": None, "steps": 7}, {"beta": 0.1})
    assert plan["steps"] == 7 and plan["batch_size"] == 8 and plan["beta"] == 0.1  # 1024 tokens / 128 per pair
    assert "budget" in plan["reasons"]["steps"]


def test_batches_depend_only_on_seed_and_step():
    epoch = [i for step in range(1, 6) for i in batch_indices(step, 20, 4, seed=3)]
    assert sorted(epoch) == list(range(20))  # one pass covers every row once
    assert batch_indices(9, 20, 4, seed=3) == batch_indices(9, 20, 4, seed=3) != batch_indices(9, 20, 4, seed=4)


def test_rule_graders():
    assert rule_reward({"type": "exact_match"}, " Paris. ", "paris") == 1.0
    assert rule_reward({"type": "exact_match"}, "It is Paris", "Paris") == 0.0
    assert rule_reward({"type": "contains"}, "It is Paris!", "paris") == 1.0
    assert rule_reward(RL_GRADER, "Apple.", None) == 1.0 and rule_reward(RL_GRADER, "An apple", None) == 0.0
    assert rule_reward({"type": "regex"}, "answer: 42", r"\b42\b") == 1.0
    schema = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
    grader = {"type": "json_schema", "schema": schema}
    assert rule_reward(grader, '```json\n{"name": "Ada"}\n```', None) == 1.0
    assert rule_reward(grader, '{"name": 3}', None) == 0.0 and rule_reward(grader, "not json", None) == 0.0
    assert len(read_rows("rl", jsonl(rl_rows()), {**RL_GRADER, "field": "answer"})) == 40


def test_tune_builds_the_request_and_reports_the_result(tmp_path):
    from tinkerd.cli import _parser
    from tinkerd.jobs.tune import report, request_fields

    data = tmp_path / "p.jsonl"
    data.write_text(jsonl(rl_rows()))
    args = _parser().parse_args(["tune", str(data), "--kind", "rl", "--grader", "regex", "--pattern", "^ok$",
                                 "--budget", "40 steps", "--set", "learning_rate=1e-4", "--set", "group_size=8"])
    fields = request_fields(args)  # a form's fields (the file goes as its part `file`: tests/jobs/test_uploads.py)
    assert json.loads(fields["grader"]) == {"type": "regex", "pattern": "^ok$"} and fields["budget"] == "40 steps"
    assert json.loads(fields["hyperparameters"]) == {"learning_rate": 1e-4, "group_size": 8}
    assert fields["kind"] == "rl" and "base_model" not in fields
    job = {"id": "job-1", "status": "succeeded", "error": None, "started": 0.0, "finished": 90.0,
           "evals": {"before": {"held_out_nll": 2.5}, "best": {"step": 6, "metrics": {"held_out_nll": 1.25}}},
           "result": {"stopped": "steps", "sampler_path": "tinker://r/sampler_weights/a",
                      "state_path": "tinker://r/weights/a"}}
    assert report(job).splitlines()[1:3] == ["  held_out_nll: 2.5 before -> 1.25 best (step 6)", "  stopped: steps"]
