"""Tokens to OpenAI text without transformers: the chat template renders the tokens transformers renders,
incremental decoding never splits a character, stop sequences end the text where OpenAI ends it."""

from __future__ import annotations

import json

import pytest

from tests.openai_tokenizer import write_char_tokenizer
from tinkerd.control.chat_tokenizer import REPLACEMENT, ChatTokenizer, TextStream
from tinkerd.control.openai_render import ChoiceText
from tinkerd.protocol.types import SampledSequence

TEXT = "Grüße aus Köln 😀 — naïve café, 東京 🎉!"


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    """A byte-level BPE with few merges: accented letters, CJK and emoji span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["hello world, the quick brown fox"] * 20, trainer)
    folder = tmp_path_factory.mktemp("byte-level")
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    return ChatTokenizer(folder)


def test_incremental_text_is_the_full_decode_in_whole_characters(byte_level):
    tokens = byte_level.encode(TEXT)
    assert len(tokens) > len(TEXT)  # multi-byte characters really are split over tokens
    stream, deltas = TextStream(byte_level), []
    for token in tokens:
        deltas.append(stream.push([token]))
    assert "".join(deltas) == TEXT == byte_level.decode(tokens)
    assert not any(REPLACEMENT in d for d in deltas) and "" in deltas  # held back, never broken
    assert b"".join(byte_level.token_bytes(t) for t in tokens) == TEXT.encode()


def test_a_partial_character_at_the_end_is_flushed_as_the_full_decode_shows_it(byte_level):
    tokens = byte_level.encode("ok 😀")[:-1]  # the emoji's last byte never came
    stream = TextStream(byte_level)
    assert stream.push(tokens) == "ok "
    assert stream.push([], final=True) == byte_level.decode(tokens)[3:] and REPLACEMENT in byte_level.decode(tokens)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_stop_sequences_end_the_text_whatever_the_chunking(tmp_path, chunk):
    tokenizer = ChatTokenizer(write_char_tokenizer(tmp_path))
    tokens = tokenizer.encode("The answer is 42.\n\nQ: next")
    choice, streamed = ChoiceText(tokenizer, ("\n\nQ:", "never"), top_logprobs=0), ""
    for i in range(0, len(tokens), chunk):
        delta = choice.add(tokens[i:i + chunk], [-0.5] * len(tokens[i:i + chunk]))
        streamed += delta.text
        assert "\n\n" not in streamed  # what may start a stop sequence waits
    delta = choice.finish(SampledSequence(tokens, [-0.5] * len(tokens), "stop"))
    assert streamed + delta.text == "The answer is 42." and delta.finish_reason == "stop"
    assert choice.generated == len(tokens)


def test_special_tokens_leave_the_text_and_the_logprobs_and_length_is_length(tmp_path):
    tokenizer = ChatTokenizer(write_char_tokenizer(tmp_path))
    tokens = tokenizer.encode("hi") + [1]  # <|im_end|>
    choice = ChoiceText(tokenizer, (), top_logprobs=0)
    delta = choice.finish(SampledSequence(tokens, [-1.0, -2.0, -3.0], "stop"))
    assert delta.text == "hi" and [t for t, _, _ in delta.tokens] == tokens[:2] and delta.finish_reason == "stop"
    cut = ChoiceText(tokenizer, (), 0).finish(SampledSequence(tokens[:2], [-1.0, -2.0], "length"))
    assert cut.finish_reason == "length"


def test_the_chat_template_renders_the_tokens_transformers_renders(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = write_char_tokenizer(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                                     chat_template=json.loads((folder / "tokenizer_config.json")
                                                                              .read_text())["chat_template"])
    ours = ChatTokenizer(folder)
    for generation_prompt in (True, False):
        expected = reference.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                                 return_dict=False)
        assert ours.encode(ours.render(messages, generation_prompt)) == list(expected)
