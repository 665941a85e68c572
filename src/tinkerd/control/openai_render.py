"""Sampled tokens as OpenAI choices: text, stop sequences, finish reasons and logprob listings.

One `ChoiceText` per choice takes the tokens as they come (all at once for a finished request, or a
few per decode step when streaming) and hands out text deltas, so the streamed text and the
non-streamed text are the same by construction. OpenAI semantics:
- the text ends before the first stop sequence (the sampler stops at it too, and returns its tokens);
  while streaming, the last `len(longest stop) - 1` characters wait until they cannot start one;
- special tokens (end of turn) are not part of the text, nor listed in the logprobs;
- logprob entries list the tokens up to the one completing a stop sequence, with their exact bytes;
- `finish_reason` is "stop" (end of turn, stop token or stop sequence) or "length".
Knows the tokenizer and the sampler's result types, not HTTP or the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tinkerd.control.chat_tokenizer import ChatTokenizer, TextStream
from tinkerd.protocol.types import SampledSequence


@dataclass
class Delta:
    text: str = ""
    tokens: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)  # (id, logprob, top)
    finish_reason: str | None = None


class ChoiceText:
    def __init__(self, tokenizer: ChatTokenizer, stops: tuple[str, ...], top_logprobs: int) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.top_logprobs = top_logprobs
        self.stream = TextStream(tokenizer)
        self.text = ""  # decoded so far, whole characters
        self.sent = 0  # characters handed out
        self.cut: int | None = None  # where a stop sequence starts, once seen
        self.generated = 0  # tokens received (usage counts them all)
        self.finish_reason: str | None = None

    def add(self, tokens: list[int], logprobs: list[float], topk: list | None = None, final: bool = False) -> Delta:
        """New tokens (with `topk`: per token an (ids, logprobs) pair or None); the text they complete."""
        delta = Delta()
        self.generated += len(tokens)
        if self.cut is None:
            for i, token in enumerate(tokens):
                if token not in self.tokenizer.special_ids:
                    delta.tokens.append((token, float(logprobs[i]), self._top(topk[i] if topk else None)))
        self.text += self.stream.push(tokens, final=final)
        if self.cut is None and self.stops:
            found = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
            self.cut = min(found) if found else None
        end = self.cut if self.cut is not None else len(self.text)
        if self.cut is None and self.stops and not final:
            end -= max(len(s) for s in self.stops) - 1
        if end > self.sent:
            delta.text, self.sent = self.text[self.sent:end], end
        return delta

    def finish(self, sequence: SampledSequence) -> Delta:
        """The request's result for this choice: the tokens not yet seen, the rest of the text, the reason."""
        start = len(self.stream.tokens)
        rest = sequence.tokens[start:]
        topk = None
        if sequence.topk_logprobs is not None:
            ids, lps = sequence.topk_logprobs
            topk = [(ids[i], lps[i]) for i in range(start, len(sequence.tokens))]
        delta = self.add(rest, sequence.logprobs[start:], topk, final=True)
        self.finish_reason = delta.finish_reason = "stop" if sequence.stop_reason == "stop" or self.cut is not None \
            else "length"
        return delta

    def _top(self, pair: tuple[np.ndarray, np.ndarray] | None) -> list[tuple[int, float]]:
        if pair is None or not self.top_logprobs:
            return []
        ids, lps = pair
        return [(int(i), float(lp)) for i, lp in zip(ids[:self.top_logprobs], lps[:self.top_logprobs])]


def chat_logprobs(tokenizer: ChatTokenizer, tokens: list[tuple[int, float, list[tuple[int, float]]]]) -> dict:
    """`choices[].logprobs` of a chat completion (or chunk)."""
    def entry(token: int, logprob: float) -> dict:
        return {"token": tokenizer.token_text(token), "logprob": logprob, "bytes": list(tokenizer.token_bytes(token))}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]} for t, lp, top in tokens],
            "refusal": None}


def completion_logprobs(tokenizer: ChatTokenizer, tokens: list[tuple[int, float | None, list[tuple[int, float]]]],
                        offset: int = 0, with_top: bool = True) -> dict:
    """`choices[].logprobs` of a (legacy) completion: parallel lists; `offset`: where the text of `tokens` starts."""
    texts = [tokenizer.token_text(t) for t, _, _ in tokens]
    offsets = list(np.cumsum([0] + [len(t) for t in texts[:-1]]) + offset) if texts else []
    return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in tokens],
            "top_logprobs": [({tokenizer.token_text(i): v for i, v in top} if lp is not None else None)
                             for _, lp, top in tokens] if with_top else None,
            "text_offset": [int(o) for o in offsets]}


def prompt_scores(prompt: list[int], prompt_logprobs: list[float] | None, topk_prompt: tuple | None,
                  k: int) -> list[tuple[int, float | None, list[tuple[int, float]]]]:
    """The prompt's tokens with their logprobs (`echo` with `logprobs`); the first has none."""
    out = []
    for i, token in enumerate(prompt):
        lp = None if i == 0 or prompt_logprobs is None else float(prompt_logprobs[i])
        top = []
        if i > 0 and topk_prompt is not None and k:
            top = [(int(t), float(v)) for t, v in zip(topk_prompt[0][i][:k], topk_prompt[1][i][:k])]
        out.append((token, lp, top))
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
