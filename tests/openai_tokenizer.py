"""A tiny character-level tokenizer with a ChatML chat template, in the files a Hugging Face tokenizer is saved
as, for the tiny random model's OpenAI-compatible routes (vocab <= 128; id 1, the model's EOS, is <|im_end|>)."""

from __future__ import annotations

import json
from pathlib import Path

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<unk>", "<|im_end|>", "<|im_start|>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]


def write_char_tokenizer(folder: Path) -> Path:
    from tokenizers import AddedToken, Tokenizer, decoders
    from tokenizers.models import BPE

    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "chat_template": CHATML}))
    return folder
