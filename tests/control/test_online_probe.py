"""The retention probe's split of an online model's stored base answers: answers marked `probe` are the held-out
probe and never trained; a model stored before the probe had prompts of its own keeps its last quarter."""

from tinkerd.control.online.examples import ANCHOR_PROMPTS, PROBE_PROMPTS
from tinkerd.control.online.probe import split_anchors
from tinkerd.control.online.spec import SETTINGS


def answer(prompt: str, probe: bool | None = None) -> dict:
    row = {"messages": [{"role": "user", "content": prompt}], "reply": "ok", "complete": True}
    if probe is not None:
        row["probe"] = probe
    return row


def test_marked_answers_are_the_probe_and_the_rest_the_anchor_set():
    stored = [answer(p, False) for p in ANCHOR_PROMPTS[:5]] + [answer(p, True) for p in PROBE_PROMPTS[:3]]
    trained, probe = split_anchors(stored)
    assert [a["messages"][0]["content"] for a in trained] == ANCHOR_PROMPTS[:5]
    assert [a["messages"][0]["content"] for a in probe] == PROBE_PROMPTS[:3]


def test_a_model_stored_without_marks_keeps_its_last_quarter_as_the_probe():
    stored = [answer(f"q{i}") for i in range(12)]
    trained, probe = split_anchors(stored)
    assert len(trained) == 9 and [a["messages"][0]["content"] for a in probe] == ["q9", "q10", "q11"]


def test_the_probe_prompts_are_never_anchor_prompts_and_the_settings_reach_every_prompt():
    assert not set(ANCHOR_PROMPTS) & set(PROBE_PROMPTS)
    assert len(set(ANCHOR_PROMPTS)) == len(ANCHOR_PROMPTS) == 64
    assert len(set(PROBE_PROMPTS)) == len(PROBE_PROMPTS)
    assert SETTINGS["anchors"][3] == len(ANCHOR_PROMPTS) and SETTINGS["probe_prompts"][3] == len(PROBE_PROMPTS)
