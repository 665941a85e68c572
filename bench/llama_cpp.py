"""tinkerd's sampler vs llama.cpp (through llama-cpp-python) on GGUFs of the same weights, same run.

    python -m bench.llama_cpp [--new-tokens 64] [--prefill-tokens 256]

llama.cpp is the anchor a CPU user would pick. It runs the embedded model's own weights in F32 (the
numbers tinkerd holds), F16 and Q8_0, written by `bench.gguf_variants`; tinkerd runs fp32. Both sides:

- batch-1 decode: the chat prompt of `bench.sample`, 64 new tokens at temperature 1 over the full
  vocabulary, no early stop. llama.cpp is driven token by token (`Llama.eval` of the prompt, then a
  `dist` sampler draw and `Llama.eval` of that token, 64 times), so EOS never ends a run; tinkerd is
  `LocalSampler.sample` with `stop_at_eos=False`. Figures are new tokens / wall seconds of the whole
  call, prompt included (as in `bench.sample`), the four arms timed in turns (median of 3 after a warm-up).
- prefill: the first 256 tokens of a long chat prompt, one token drawn after it (tinkerd: a sample with
  max_tokens=1; llama.cpp: `Llama.eval` of the prompt and one draw), prompt tokens / wall seconds.

llama.cpp's own timings (`llama_perf_context`, reset before each run) are reported too:
`llama_<v>_eval_tok_s_b1` counts its single-token decode steps only (prompt excluded),
`llama_<v>_eval_tok_s_prefill` its prompt eval. The bandwidth roofline of batch-1 fp32 decode is read
GB/s (`memory_read_gb_s`, measured in this run) / fp32 weight bytes; torch's sum can read slower than the
memory allows (llama.cpp F32 has decoded at ~1.2x this roofline here, `llama_f32_vs_roofline_b1`), so
beating llama.cpp F32 is the stricter of the two decode targets. No reduced-precision mode exists in
tinkerd yet, so its figure against Q8_0 is null (not measured). Before timing, the run checks that
llama.cpp's greedy decoding of the chat prompt gives tinkerd's temperature-0 tokens (F32 should match
all `greedy_tokens`; `greedy_same_prefix_<v>` says how many leading tokens agree, and a mismatch of F32
is a warning on stderr). Threads: tinkerd as `tinkerd serve` sets them (`configure_threads`), llama.cpp
`n_threads` = the same torch thread count. Progress on stderr.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

CHAT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]  # bench.sample's
N_CTX = 1024
SEED = 0


def long_chat_prompt(tokenizer, n: int) -> list[int]:
    """The first `n` tokens of a chat prompt longer than that."""
    notes = " ".join(f"Note {i}: the robot mixed a new colour and painted one more stroke on the canvas." for i in range(n))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Summarize these notes.\n" + notes}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    assert len(ids) >= n, len(ids)
    return list(ids[:n])


def same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class LlamaArm:
    """One llama.cpp model, driven token by token; keeps its perf counters of each run."""

    def __init__(self, path, threads: int, seed: int = SEED) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, n_batch=512, n_ubatch=512, n_threads=threads,
                                   n_threads_batch=threads, seed=seed, verbose=False)
        # temperature 1 over the whole vocabulary: the dist sampler alone (it softmaxes the raw logits)
        self.dist = self._chain(llama_cpp.llama_sampler_init_dist(seed))
        self.greedy = self._chain(llama_cpp.llama_sampler_init_greedy())
        self.perf: list = []

    def _chain(self, sampler):
        chain = self.lib.llama_sampler_chain_init(self.lib.llama_sampler_chain_default_params())
        self.lib.llama_sampler_chain_add(chain, sampler)
        return chain

    def generate(self, prompt: list[int], n: int, greedy: bool = False) -> list[int]:
        """Eval the prompt, then draw and eval one token at a time; no stop token ends it."""
        llm, ctx = self.llm, self.llm.ctx
        sampler = self.greedy if greedy else self.dist
        llm.reset()
        self.lib.llama_perf_context_reset(ctx)
        llm.eval(prompt)
        tokens = []
        for i in range(n):
            tokens.append(self.lib.llama_sampler_sample(sampler, ctx, -1))
            if i + 1 < n:
                llm.eval(tokens[-1:])
        self.perf.append(self.lib.llama_perf_context(ctx))
        return tokens

    def close(self) -> None:
        for chain in (self.dist, self.greedy):
            self.lib.llama_sampler_free(chain)
        self.llm.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--greedy-tokens", type=int, default=16)
    args = parser.parse_args()

    from tinkerd.engine.threads import configure_threads

    configure_threads(None)  # as `tinkerd serve` does, before torch loads
    import torch

    from bench.common import alternating_medians, embedded_model_files, emit, memory_read_gb_s
    from bench.gguf_variants import VARIANTS, ensure_variants
    from tinkerd.engine.interface import AdapterRef
    from tinkerd.engine.runtime import ModelRuntime
    from tinkerd.engine.sampler import LocalSampler
    from tinkerd.protocol.types import SamplingParams

    started = time.perf_counter()
    files = embedded_model_files()
    ggufs = ensure_variants()
    runtime = ModelRuntime.load(files, dtype="fp32")
    sampler = LocalSampler({runtime.name: runtime})
    base = AdapterRef(None, runtime.name)
    threads = torch.get_num_threads()
    arms = {v.lower(): LlamaArm(ggufs[v], threads) for v in VARIANTS}
    prompt = runtime.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    long_prompt = long_chat_prompt(runtime.tokenizer, args.prefill_tokens)
    n_new = args.new_tokens
    weight_bytes = sum(w.numel() * w.element_size() for w in runtime.model.parameters())  # tied embedding once
    bandwidth = memory_read_gb_s() * 1e9
    roofline = bandwidth / weight_bytes
    figures: dict = {"new_tokens": n_new, "prompt_tokens": len(prompt), "prefill_tokens": len(long_prompt),
                     "dtype": "fp32", "threads": threads, "weight_gb": weight_bytes / 1e9,
                     "memory_read_gb_s": bandwidth / 1e9, "roofline_tok_s_b1": roofline}

    # the weights are the same: greedy decoding must agree (F16 and Q8_0 may drift, reported for reference)
    ours = sampler.sample(base, prompt, 1, SamplingParams(max_tokens=args.greedy_tokens, temperature=0.0,
                                                          stop_at_eos=False)).sequences[0].tokens
    figures["greedy_tokens"] = args.greedy_tokens
    for name, arm in arms.items():
        figures[f"greedy_same_prefix_{name}"] = same_prefix(ours, arm.generate(prompt, args.greedy_tokens, greedy=True))
    print(f"greedy check, tokens equal to tinkerd's of {args.greedy_tokens}: "
          + ", ".join(f"{n} {figures[f'greedy_same_prefix_{n}']}" for n in arms), file=sys.stderr)
    if figures["greedy_same_prefix_f32"] != args.greedy_tokens:
        print("WARNING: llama.cpp F32 does not decode greedily like tinkerd on the same weights", file=sys.stderr)

    decode_params = SamplingParams(max_tokens=n_new, seed=SEED, stop_at_eos=False)
    prefill_params = SamplingParams(max_tokens=1, seed=SEED, stop_at_eos=False)
    for phase, tokens, steps in (
        ("decode", n_new, {"tinkerd": lambda: sampler.sample(base, prompt, 1, decode_params),
                           **{n: (lambda a=a: a.generate(prompt, n_new)) for n, a in arms.items()}}),
        ("prefill", len(long_prompt), {"tinkerd": lambda: sampler.sample(base, long_prompt, 1, prefill_params),
                                       **{n: (lambda a=a: a.generate(long_prompt, 1)) for n, a in arms.items()}}),
    ):
        for arm in arms.values():
            arm.perf.clear()
        print(f"timing {phase} ({tokens} tokens): {', '.join(steps)} in turns", file=sys.stderr)
        seconds = alternating_medians(steps)
        suffix = "_b1" if phase == "decode" else "_prefill"
        ours_tok_s = tokens / seconds["tinkerd"]
        figures[f"tinkerd_tok_s{suffix}"] = ours_tok_s
        for name, arm in arms.items():
            timed = arm.perf[-3:]  # the timed runs, after the warm-up
            if phase == "decode":
                own = statistics.median([p.n_eval * 1e3 / p.t_eval_ms for p in timed])
            else:
                own = statistics.median([p.n_p_eval * 1e3 / p.t_p_eval_ms for p in timed])
            figures[f"llama_{name}_tok_s{suffix}"] = tokens / seconds[name]
            figures[f"llama_{name}_eval_tok_s{suffix}"] = own
            figures[f"tinkerd_vs_llama_{name}{suffix}"] = ours_tok_s / (tokens / seconds[name])
        if phase == "decode":
            figures["tinkerd_vs_roofline_b1"] = ours_tok_s / roofline
            figures["llama_f32_vs_roofline_b1"] = figures["llama_f32_tok_s_b1"] / roofline
    figures["tinkerd_reduced_vs_llama_q8_0_b1"] = None  # no reduced-precision mode yet: not measured
    figures["llama_cpp"] = arms["f32"].lib.__version__
    figures["seconds"] = time.perf_counter() - started
    for arm in arms.values():
        arm.close()
    emit("llama_cpp", **figures)


if __name__ == "__main__":
    main()
