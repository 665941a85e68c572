"""The retention probe: how well the model still gives the base model's own answers to general prompts.

The base answers sampled at creation are of two kinds: the anchor set, trained on in every update (replay of what
the base model knew), and the held-out probe (marked `probe`), never trained on. A model created before the probe
had prompts of its own holds no marks: the last quarter of its answers is its probe. An answer cut off at
`anchor_max_tokens` is not taught to end there. `retention` measures the mean reply NLL per token of both under the
run's current weights, with one forward pass. Knows examples and the driver; not when it is called.
"""

from __future__ import annotations

from tinkerd.control.chat_tokenizer import ChatTokenizer
from tinkerd.control.online.driver import RunDriver
from tinkerd.control.online.examples import Example, reply_datum, reply_nll


def split_anchors(anchors: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the anchor set, the held-out probe) of a model's stored base answers."""
    if any("probe" in a for a in anchors):
        return [a for a in anchors if not a.get("probe")], [a for a in anchors if a.get("probe")]
    held_out = len(anchors) // 4
    return anchors[:len(anchors) - held_out], anchors[len(anchors) - held_out:]


def anchor_examples(tokenizer: ChatTokenizer, anchors: list[dict], weight: float,
                    context: int) -> tuple[list[Example], list[Example]]:
    """(trained anchors weighted `weight`, held-out probe)."""
    trained, probe = split_anchors(anchors)
    return ([reply_datum(tokenizer, a["messages"], a["reply"], weight, max_tokens=context,
                         end_turn=a.get("complete", True)) for a in trained],
            [reply_datum(tokenizer, a["messages"], a["reply"], max_tokens=context, end_turn=a.get("complete", True))
             for a in probe])


async def retention(driver: RunDriver, trained: list[Example], probe: list[Example]) -> dict:
    """{"anchor_nll", "probe_nll"}: None for an empty part."""
    if not trained and not probe:
        return {"anchor_nll": None, "probe_nll": None}
    logprobs = await driver.forward([e.datum for e in trained + probe])
    return {"anchor_nll": reply_nll(trained, logprobs[:len(trained)]) if trained else None,
            "probe_nll": reply_nll(probe, logprobs[len(trained):]) if probe else None}
