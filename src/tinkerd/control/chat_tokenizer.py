"""A base model's tokenizer and chat template in the server process, without torch or transformers.

The OpenAI-compatible routes turn `messages` into tokens and tokens back into text. The engine has the
same tokenizer, but it may live in another process (Ray) and the server must stay torch-free
(`tests/test_layers.py`), so this module reads the tokenizer's own files with the `tokenizers`
library and renders the chat template with Jinja the way `transformers.apply_chat_template` does
(sandboxed, `trim_blocks`/`lstrip_blocks`, `loopcontrols`, `tojson`, `raise_exception`,
`strftime_now`; encoding without added special tokens). tests/control/test_chat_tokenizer.py checks
the tokens against transformers'. Files come from a folder, or from the local Hugging Face hub cache
by `BaseModelInfo.tokenizer_id` (tinkerd writes the embedded model's there at start), never the network.

`TextStream` turns a growing token list into text deltas that are always whole characters: a
character split over several byte-level tokens is held back until its last byte arrives.
Knows nothing about HTTP, the scheduler or what the text is for.
"""

from __future__ import annotations

import datetime
import json
import threading
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer

from tinkerd.protocol.types import BadRequest

REPLACEMENT = "\ufffd"  # what decoding shows for the bytes of a character not complete yet


class TemplateError(ValueError):
    """The chat template refused the messages (its own `raise_exception`) or could not render them."""


def _special(value) -> str | None:
    """A special token entry of tokenizer_config.json: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte-level alphabet (byte -> printable character), for tokens' exact bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class ChatTokenizer:
    def __init__(self, folder: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.special_tokens = {key: _special(config.get(key)) for key in
                               ("bos_token", "eos_token", "unk_token", "pad_token")}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").is_file():  # where transformers >= 4.43 saves it
            template = (folder / "chat_template.jinja").read_text()
        self.chat_template: str | None = template
        self.special_ids = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        self._byte_level = type(self.tokenizer.decoder).__name__ == "ByteLevel"
        self._compiled = _environment().from_string(template) if template else None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages`; TemplateError if it refuses them."""
        if self._compiled is None:
            raise BadRequest("messages: this model's tokenizer has no chat template; use /completions with a prompt")
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                         **{k: v for k, v in self.special_tokens.items() if v is not None})
        except jinja2.TemplateError as exc:
            raise TemplateError(str(exc)) from exc

    def encode(self, text: str) -> list[int]:
        """Tokens of `text` as they are (special tokens in it are recognised; none added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (byte-level BPE: the token's alphabet mapped back)."""
        piece = self.tokenizer.id_to_token(token_id) or ""
        table = _unicode_to_byte()
        if self._byte_level and token_id not in self.special_ids and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()

    def token_text(self, token_id: int) -> str:
        """One token as text for logprob listings (bytes of a partial character become U+FFFD)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")


def _environment() -> jinja2.Environment:
    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


class TextStream:
    """The text of a growing token list, handed out as deltas of whole characters.

    Decodes a window of the sequence (from the last point where the text was complete) rather than
    each token alone, so merged and multi-byte tokens come out as the full decode would give them;
    a trailing U+FFFD (a character whose last bytes are still to come) waits for the next token.
    """

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._prefix = 0  # start of the decoded window
        self._read = 0  # tokens before this are in `text`

    def push(self, tokens: list[int], final: bool = False) -> str:
        """Append tokens; the new text they complete (`final`: everything left, partial characters too)."""
        self.tokens += tokens
        settled = self.tokenizer.decode(self.tokens[self._prefix:self._read])
        window = self.tokenizer.decode(self.tokens[self._prefix:])
        if len(window) <= len(settled) or (window.endswith(REPLACEMENT) and not final):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return window[len(settled):]


class Tokenizers:
    """Each base model's `ChatTokenizer`, loaded once on first use (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: dict[str, ChatTokenizer] = {}
        self.folders: dict[str, Path] = {}  # tokenizer_id -> folder, where the hub cache is not the place

    def get(self, tokenizer_id: str) -> ChatTokenizer:
        with self._lock:
            if tokenizer_id not in self._loaded:
                self._loaded[tokenizer_id] = ChatTokenizer(self._folder(tokenizer_id))
            return self._loaded[tokenizer_id]

    def _folder(self, tokenizer_id: str) -> Path:
        if tokenizer_id in self.folders:
            return self.folders[tokenizer_id]
        if Path(tokenizer_id).is_dir():
            return Path(tokenizer_id)
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(tokenizer_id, local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - not cached here (or not a hub id)
            raise BadRequest(f"model: the tokenizer {tokenizer_id!r} of this base model is not available to the "
                             f"server ({type(exc).__name__}); use the SDK with token ids") from exc
