"""Chat with a checkpoint: a multi-turn REPL on stdin/stdout.

    python -m cookbook.chat_pipeline.chat [checkpoint=tinker://...] [base_url=http://127.0.0.1:8000]
    printf 'Who are you?\\nWhat is 12 + 30?\\n' | python -m cookbook.chat_pipeline.chat

Each stdin line is a user turn; the reply is printed as one "assistant: ..." block and the whole conversation
so far is the next prompt. `/reset` starts a new conversation; EOF (Ctrl-D) ends. Without `checkpoint` the
final checkpoint of `<log_dir>/summary.json` (written by `cookbook.chat_pipeline.train`) is used, or the base
model if there is none. Without `base_url`, a local tinkerd is started on `<log_dir>/server`, the data
directory the training run used, so its checkpoints are there.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Iterable

from tinker import types

from cookbook.common import BaseConfig, decode, log_dir_for, parse_config, prompt_tokens, service_client, stop_params


@dataclasses.dataclass
class Config(BaseConfig):
    checkpoint: str | None = None  # a tinker:// sampler path; None: <log_dir>/summary.json's, else the base model
    system: str | None = None  # a system prompt for every conversation
    max_tokens: int = 128
    temperature: float = 0.0


def chat(sampler, tokenizer, lines: Iterable[str], config: Config, out=sys.stdout) -> list[str]:
    """Answer each non-empty line as the next user turn of one conversation; returns the replies."""
    history: list[dict] = []
    replies = []
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": text})
        msgs = ([{"role": "system", "content": config.system}] if config.system else []) + history
        prompt = types.ModelInput.from_ints(prompt_tokens(tokenizer, msgs))
        seq = sampler.sample(prompt, 1, stop_params(tokenizer, config.max_tokens, config.temperature)).result().sequences[0]
        reply = decode(tokenizer, seq.tokens)
        history.append({"role": "assistant", "content": reply})
        replies.append(reply)
        print(f"assistant: {reply}", file=out, flush=True)
    return replies


def main(config: Config, lines: Iterable[str] | None = None) -> list[str]:
    log_dir = log_dir_for(config, "chat_pipeline")
    checkpoint = config.checkpoint
    if checkpoint is None and (log_dir / "summary.json").exists():
        checkpoint = json.loads((log_dir / "summary.json").read_text())["checkpoint"]
    with service_client(config, log_dir) as service:
        if checkpoint:
            sampler = service.create_sampling_client(model_path=checkpoint).result()
        else:
            sampler = service.create_sampling_client(base_model=config.base_model).result()
        tokenizer = sampler.get_tokenizer()
        print(f"chatting with {checkpoint or config.base_model} (one line per turn, /reset, Ctrl-D to quit)",
              file=sys.stderr)
        return chat(sampler, tokenizer, sys.stdin if lines is None else lines, config)


if __name__ == "__main__":
    main(parse_config(Config))
