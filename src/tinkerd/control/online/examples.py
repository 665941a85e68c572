"""Feedback and anchors as training data: token sequences whose reply positions carry the loss.

`reply_datum` renders a conversation with the base model's own chat template (the same text the chat route
samples from), appends a reply and its end-of-turn, and weights the reply's tokens by `weight / tokens` (each
example counts the same, whatever its length). `feedback_examples` turns one stored piece of feedback into its
`Example`s (a correction: one; a preference: the preferred and the rejected reply, weighted later by the DPO
rule; a rating: the reply weighted by the rating). `ANCHOR_PROMPTS` are the general prompts whose base answers
the anchor set holds, `PROBE_PROMPTS` the held-out ones of the retention probe. Knows tokenizers and the wire
`Datum`; not the Store, the engine nor the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinkerd.control.chat_tokenizer import ChatTokenizer
from tinkerd.protocol.types import Datum

# General prompts whose base answers are the anchor set, replayed in every update (the first `anchors` of them).
ANCHOR_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain what photosynthesis is in one sentence.",
    "Write a short poem about the sea.",
    "How many days are there in a week?",
    "What is 12 plus 7?",
    "Name a primary colour.",
    "Why is the sky blue?",
    "Translate 'thank you' into Spanish.",
    "Describe a rainy day in two sentences.",
    "What is the largest planet in our solar system?",
    "List three fruits.",
    "How do you make a cup of tea?",
    "What is the difference between weather and climate?",
    "Write a haiku about autumn leaves.",
    "What causes the seasons on Earth?",
    "How does a bicycle stay upright?",
    "Give me a recipe for a simple salad.",
    "What is the square root of 81?",
    "Who wrote Romeo and Juliet?",
    "Explain gravity to a ten-year-old.",
    "What are the three states of matter?",
    "Write a friendly email inviting a colleague to lunch.",
    "What is a noun? Give two examples.",
    "How can I improve my sleep?",
    "Why do cats purr?",
    "What is the speed of light?",
    "Summarise the water cycle.",
    "Tell me a fun fact about octopuses.",
    "What should I pack for a weekend camping trip?",
    "How do vaccines work?",
    "What is the opposite of 'generous'?",
    "Convert 5 kilometres to miles.",
    "Write two sentences about a dragon who loves books.",
    "What is the main job of the heart?",
    "How do I start learning to play the guitar?",
    "What is the chemical symbol for gold?",
    "Describe the taste of a lemon.",
    "Why is exercise good for you?",
    "What is a prime number?",
    "Give me a motivational quote and explain it.",
    "How do plants get water?",
    "What is the tallest mountain in the world?",
    "Explain what a computer program is.",
    "What are some ways to save money on groceries?",
    "Write a short story opening set in a lighthouse.",
    "Why do we have leap years?",
    "What does a librarian do?",
    "How many continents are there, and what are they?",
    "What is the difference between a frog and a toad?",
    "Suggest three hobbies for someone who likes the outdoors.",
    "What is inflation?",
    "How do bees make honey?",
    "Explain the rules of tic-tac-toe.",
    "What is the freezing point of water in Fahrenheit?",
    "Give me advice for a job interview.",
    "What is the moon made of?",
    "Write a limerick about a cat.",
    "Why do leaves change colour in autumn?",
    "What is a verb?",
    "How does a rainbow form?",
    "What are the benefits of reading books?",
    "Describe a busy city street in the morning.",
    "What is 15 percent of 200?",
]
# Held-out general prompts: their base answers are the retention probe, measured after every update, never trained.
PROBE_PROMPTS = [
    "What does a thermometer measure?",
    "Suggest a name for a pet cat.",
    "What is the boiling point of water in Celsius?",
    "Explain how a refrigerator keeps food cold.",
    "Write a short thank-you note to a teacher.",
    "What are clouds made of?",
    "Give me two tips for learning a new language.",
    "Why do birds migrate?",
]


@dataclass
class Example:
    datum: Datum
    reply_positions: np.ndarray  # bool (T,): the target positions that are the reply's tokens
    role: str = "sft"  # sft | chosen | rejected


def reply_tokens(tokenizer: ChatTokenizer, messages: list[dict], reply: str,
                 end_turn: bool = True) -> tuple[list[int], list[int]]:
    """(prompt tokens, reply tokens with the end of turn) as the chat route would see them; without `end_turn`
    (a reply cut off at max_tokens) the reply's tokens alone."""
    prompt_text = tokenizer.render(messages)
    if not end_turn:
        return tokenizer.encode(prompt_text), tokenizer.encode(reply)
    full_text = tokenizer.render(messages + [{"role": "assistant", "content": reply}], add_generation_prompt=False)
    if not full_text.startswith(prompt_text):  # a template that rewrites earlier turns: fall back to EOS
        eos = tokenizer.special_tokens.get("eos_token") or ""
        return tokenizer.encode(prompt_text), tokenizer.encode(reply + eos)
    return tokenizer.encode(prompt_text), tokenizer.encode(full_text[len(prompt_text):].rstrip("\n"))


def reply_datum(tokenizer: ChatTokenizer, messages: list[dict], reply: str, weight: float = 1.0,
                role: str = "sft", max_tokens: int | None = None, end_turn: bool = True) -> Example:
    prompt, answer = reply_tokens(tokenizer, messages, reply, end_turn)
    tokens = prompt + answer
    cut = max(0, len(tokens) - max_tokens) if max_tokens is not None else 0  # keep the reply, cut the start
    tokens, prompt_left = tokens[cut:], max(1, len(prompt) - cut)
    targets = np.array(tokens[1:], dtype=np.int64)
    positions = np.zeros(len(targets), dtype=bool)
    positions[prompt_left - 1:] = True
    weights = positions.astype(np.float32) * (weight / max(1, int(positions.sum())))
    datum = Datum(np.array(tokens[:-1], dtype=np.int64), {"target_tokens": targets, "weights": weights})
    return Example(datum, positions, role)


def feedback_examples(tokenizer: ChatTokenizer, kind: str, feedback: dict, max_tokens: int) -> list[Example]:
    messages = feedback["messages"]
    if kind == "correction":
        return [reply_datum(tokenizer, messages, feedback["correction"], max_tokens=max_tokens)]
    if kind == "preference":
        return [reply_datum(tokenizer, messages, feedback["preferred"], role="chosen", max_tokens=max_tokens),
                reply_datum(tokenizer, messages, feedback["rejected"], role="rejected", max_tokens=max_tokens)]
    return [reply_datum(tokenizer, messages, feedback["reply"], weight=feedback["rating"], max_tokens=max_tokens)]


def with_weight(example: Example, scale: float) -> Datum:
    """The example's datum with its reply weights multiplied by `scale` (a DPO pair's sigmoid factor)."""
    inputs = dict(example.datum.loss_inputs)
    inputs["weights"] = (inputs["weights"] * np.float32(scale)).astype(np.float32)
    return Datum(example.datum.tokens, inputs)


def reply_logprob(example: Example, logprobs: list[float]) -> float:
    """The summed logprob of the reply's tokens, from a forward pass's per-position `logprobs`."""
    return float(np.asarray(logprobs, dtype=np.float64)[example.reply_positions].sum())


def reply_nll(examples: list[Example], logprobs: list[list[float]]) -> float:
    """Mean negative logprob per reply token over `examples` (the retention probe)."""
    total = sum(-reply_logprob(e, lp) for e, lp in zip(examples, logprobs))
    tokens = sum(int(e.reply_positions.sum()) for e in examples)
    return total / max(1, tokens)
