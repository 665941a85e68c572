"""Merged export: base + adapter written as one plain HF model gives tinkerd's logits with the adapter.

(PEFT's own loading of the adapter folder is covered by test_peft_parity.py.)
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tinkerd.engine.merge import merge_adapter_into_model
from tinkerd.engine.interface import AdapterSpec
from tinkerd.engine.trainer import LocalTrainer
from tests.conftest import make_tiny_model, make_tiny_runtime

TOKENS = torch.tensor([[5, 9, 3, 7, 2, 11, 40, 127], [1, 2, 3, 4, 5, 6, 7, 8]])


def _trained_adapter(tmp_path, spec: AdapterSpec, seed: int = 3):
    trainer = LocalTrainer({"tiny": make_tiny_runtime(seed=seed)})
    trainer.create_adapter("m", "tiny", spec)
    for name, p in trainer.runtimes["tiny"].lora.named_parameters("m"):
        if name.endswith("lora_B"):
            p.data.normal_(std=0.2)
    trainer.save_sampler_weights("m", tmp_path / "adapter")
    make_tiny_model(seed).save_pretrained(tmp_path / "base")
    return trainer.runtimes["tiny"]


@pytest.mark.parametrize("spec", [AdapterSpec(rank=4, seed=2), AdapterSpec(rank=2, seed=1, train_unembed=False)],
                         ids=["with-unembed", "without-unembed"])
def test_merged_model_gives_tinkerds_logits_with_the_adapter(tmp_path, spec):
    runtime = _trained_adapter(tmp_path, spec)
    out = merge_adapter_into_model(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = runtime.logits(TOKENS, torch.ones_like(TOKENS), ["m", "m"])
        base = runtime.logits(TOKENS, torch.ones_like(TOKENS), [None, None])
        theirs = merged(input_ids=TOKENS).logits.float()
    assert (ours - base).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)

    # The output layer got its own weight only when the adapter trains it; the embeddings are untouched.
    embed, head = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    assert (head is embed) == (not spec.train_unembed)
    torch.testing.assert_close(embed, make_tiny_model(3).get_input_embeddings().weight)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] == (not spec.train_unembed)
    assert not list(tmp_path.glob(".merge-*"))  # the temp folder was renamed into place


def test_merge_in_bf16_and_tokenizer_files_are_copied(tmp_path):
    _trained_adapter(tmp_path, AdapterSpec(rank=4, seed=2))
    (tmp_path / "base" / "tokenizer.json").write_text('{"marker": 1}')
    fp32 = merge_adapter_into_model(tmp_path / "base", tmp_path / "adapter", tmp_path / "fp32")
    bf16 = merge_adapter_into_model(tmp_path / "base", tmp_path / "adapter", tmp_path / "bf16", dtype="bf16")
    assert (bf16 / "tokenizer.json").read_text() == '{"marker": 1}'
    exact = AutoModelForCausalLM.from_pretrained(fp32).state_dict()
    rounded = AutoModelForCausalLM.from_pretrained(bf16).state_dict()
    assert rounded.keys() == exact.keys()
    for name, value in rounded.items():  # merged in fp32, then rounded once
        assert value.dtype == torch.bfloat16 and torch.equal(value, exact[name].to(torch.bfloat16)), name


def test_adapter_that_does_not_fit_the_base_is_refused(tmp_path):
    _trained_adapter(tmp_path, AdapterSpec(rank=4, seed=2))
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(wider).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="does not fit"):
        merge_adapter_into_model(tmp_path / "other", tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
