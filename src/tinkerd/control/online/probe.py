"""The retention probe: how well the model still gives the base model's own answers to the anchor prompts.

The anchor set is split: the first three quarters are trained on in every update (replay of what the base model
knew), the last quarter is never trained on (the held-out probe). An answer cut off at `anchor_max_tokens` is not
taught to end there. `retention` measures the mean reply NLL per token of both under the run's current weights,
with one forward pass. Knows examples and the driver; not when it is called.
"""

from __future__ import annotations

from tinkerd.control.chat_tokenizer import ChatTokenizer
from tinkerd.control.online.driver import RunDriver
from tinkerd.control.online.examples import Example, reply_datum, reply_nll


def anchor_examples(tokenizer: ChatTokenizer, anchors: list[dict], weight: float,
                    context: int) -> tuple[list[Example], list[Example]]:
    """(trained anchors weighted `weight`, held-out probe)."""
    held_out = len(anchors) // 4
    trained = [reply_datum(tokenizer, a["messages"], a["reply"], weight, max_tokens=context,
                           end_turn=a.get("complete", True)) for a in anchors[:len(anchors) - held_out]]
    probe = [reply_datum(tokenizer, a["messages"], a["reply"], max_tokens=context, end_turn=a.get("complete", True))
             for a in anchors[len(anchors) - held_out:]]
    return trained, probe


async def retention(driver: RunDriver, trained: list[Example], probe: list[Example]) -> dict:
    """{"anchor_nll", "probe_nll"}: None for an empty part."""
    if not trained and not probe:
        return {"anchor_nll": None, "probe_nll": None}
    logprobs = await driver.forward([e.datum for e in trained + probe])
    return {"anchor_nll": reply_nll(trained, logprobs[:len(trained)]) if trained else None,
            "probe_nll": reply_nll(probe, logprobs[len(trained):]) if probe else None}
