"""Sampling throughput: tinkerd's sampler vs Hugging Face `generate` on the same weights, same run.

    python -m bench.sample [--new-tokens 64] [--dtype auto]

Both sample at temperature 1 with 64 new tokens (no early stop) from the same chat prompt, at
batch 1, batch 16 and a 64-sample GRPO-style group. Figures are sampled tokens per second
(all streams), median of 3 after a warm-up, the two timed in turns; the JSON line gives ours, the peer's, and ratios.
The roofline says what this machine allows: a decode step reads every weight once whatever the
batch (N x read GB/s / weight bytes caps small batches) and multiplies 2 x params FLOPs per token
(peak / (2 x params) caps big ones); `roofline_tok_s_bN` is the lower of the two, both measured
in the same run, and `tinkerd_vs_roofline_bN` how close ours comes to it.

`mixed_adapters_vs_one` (`--mixed-rows`, 16 by default): that many rows decoding together, each through a
different LoRA adapter (rank 32 on every projection, as the SDK's default), against as many samples of one
adapter, the two timed in turns: the cost of serving many tenants' adapters in one batch.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import alternating_medians, compute_dtype, embedded_model_files, emit, memory_read_gb_s
from bench.train import peak_flops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--mixed-rows", type=int, default=16)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from tinkerd.engine.interface import AdapterRef
    from tinkerd.engine.runtime import DTYPES, ModelRuntime
    from tinkerd.engine.sampler import LocalSampler
    from tinkerd.protocol.types import SamplingParams

    files = embedded_model_files()
    args.dtype = compute_dtype() if args.dtype == "auto" else args.dtype
    runtime = ModelRuntime.load(files, dtype=args.dtype)
    sampler = LocalSampler({runtime.name: runtime})
    peer = AutoModelForCausalLM.from_pretrained(files.folder, dtype=DTYPES[args.dtype]).eval()
    prompt = runtime.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a robot who learns to paint."}],
        add_generation_prompt=True, tokenize=True, return_dict=False)
    n_new = args.new_tokens
    weights = list(runtime.model.parameters())  # a tied embedding counted once, as the unembedding
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    bandwidth, peak = memory_read_gb_s() * 1e9, peak_flops(DTYPES[args.dtype])
    compute_bound = peak / (2 * sum(w.numel() for w in weights))
    figures: dict[str, float] = {"new_tokens": n_new, "prompt_tokens": len(prompt), "dtype": args.dtype,
                                 "weight_gb": weight_bytes / 1e9, "memory_read_gb_s": bandwidth / 1e9,
                                 "peak_gflops": peak / 1e9}

    for batch in (int(b) for b in args.batches.split(",")):
        params = SamplingParams(max_tokens=n_new, seed=0, stop_at_eos=False)
        inputs = torch.tensor([prompt])

        def hf_generate() -> None:
            with torch.no_grad():
                peer.generate(inputs, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=n_new,
                              min_new_tokens=n_new, num_return_sequences=batch, pad_token_id=0)

        seconds = alternating_medians({"tinkerd": lambda: sampler.sample(AdapterRef(None, runtime.name), prompt,
                                                                         batch, params), "hf": hf_generate})
        ours, theirs = seconds["tinkerd"], seconds["hf"]
        figures[f"tinkerd_tok_s_b{batch}"] = batch * n_new / ours
        figures[f"hf_generate_tok_s_b{batch}"] = batch * n_new / theirs
        figures[f"ratio_b{batch}"] = theirs / ours
        roofline = min(batch * bandwidth / weight_bytes, compute_bound)
        figures[f"roofline_tok_s_b{batch}"] = roofline
        figures[f"tinkerd_vs_roofline_b{batch}"] = batch * n_new / ours / roofline
    figures.update(mixed_adapters(sampler, runtime, prompt, n_new, args.mixed_rows))
    emit("sample", **figures)


def mixed_adapters(sampler, runtime, prompt: list[int], n_new: int, rows: int) -> dict[str, float]:
    """`rows` requests of one sample, each through its own adapter, vs one request of `rows` samples of one."""
    from tinkerd.engine.interface import AdapterRef, AdapterSpec, SampleTask
    from tinkerd.protocol.types import SamplingParams

    keys = [f"bench-mixed@{i}" for i in range(rows)]
    for i, key in enumerate(keys):
        runtime.lora.add(key, AdapterSpec(rank=32, seed=i), trainable=False)
        with torch.no_grad():  # B = 0 would be the base model's output; make each adapter a real delta
            for module in runtime.lora.modules.values():
                if key in module.adapters:
                    module.adapters[key].B.normal_(0, 1e-3, generator=torch.Generator().manual_seed(i))
    params = SamplingParams(max_tokens=n_new, seed=0, stop_at_eos=False)

    def mixed() -> None:
        pending = {f"mixed-{key}": key for key in keys}
        for request_id, key in pending.items():
            sampler.submit(SampleTask(request_id, AdapterRef.in_memory(key, runtime.name), list(prompt), 1, params))
        while pending:
            for done_id, outcome in sampler.step():
                if isinstance(outcome, Exception):
                    raise outcome
                pending.pop(done_id, None)

    def one() -> None:
        sampler.sample(AdapterRef.in_memory(keys[0], runtime.name), prompt, rows, params)

    seconds = alternating_medians({"mixed": mixed, "one": one})
    return {f"tok_s_{rows}_rows_{rows}_adapters": rows * n_new / seconds["mixed"],
            f"tok_s_{rows}_rows_one_adapter": rows * n_new / seconds["one"],
            "mixed_adapters_vs_one": seconds["one"] / seconds["mixed"]}


if __name__ == "__main__":
    main()
