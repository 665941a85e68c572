"""Weights to sampler: from `optim_step` done to the first token sampled from the new weights.

    python -m bench.weights_to_sampler [--repeats 5]

tinkerd: `save_weights_and_get_sampling_client()` + a 1-token `sample` through the SDK (an
in-memory snapshot, no files). Peer: what a user does without it: save the PEFT adapter,
load it onto a base model with peft, and generate one token with HF.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import MODEL_CACHE, compute_dtype, embedded_model_files, emit

EMBEDDED = "HuggingFaceTB/SmolLM2-135M-Instruct"


def tinkerd_latencies(repeats: int) -> list[float]:
    import tinker
    from tinker import types

    from tinkerd.local_server import LocalServer

    with tempfile.TemporaryDirectory() as tmp, LocalServer(Path(tmp), model_cache=MODEL_CACHE) as server:
        training = tinker.ServiceClient(base_url=server.url, api_key="tml-bench").create_lora_training_client(
            base_model=EMBEDDED, rank=32, seed=0).result()
        datum = types.Datum(model_input=types.ModelInput.from_ints(list(range(10, 74))),
                            loss_fn_inputs={"target_tokens": list(range(11, 75)), "weights": [1.0] * 64})
        prompt = types.ModelInput.from_ints(list(range(100, 140)))
        out = []
        for _ in range(repeats + 1):
            training.forward_backward([datum], "cross_entropy").result()
            training.optim_step(types.AdamParams(learning_rate=1e-4)).result()
            started = time.perf_counter()
            sampler = training.save_weights_and_get_sampling_client().result()
            sampler.sample(prompt, 1, types.SamplingParams(max_tokens=1)).result()
            out.append(time.perf_counter() - started)
        return out[1:]


def peft_reload_latencies(repeats: int) -> list[float]:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from tinkerd.engine.runtime import DTYPES

    folder = embedded_model_files().folder
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[compute_dtype()]),
                             LoraConfig(r=32, lora_alpha=32, target_modules=targets))
    prompt = torch.arange(100, 140)[None]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats + 1):
            started = time.perf_counter()
            trained.save_pretrained(f"{tmp}/a{i}")
            base = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[compute_dtype()])
            sampler = PeftModel.from_pretrained(base, f"{tmp}/a{i}")
            with torch.no_grad():
                sampler.generate(prompt, max_new_tokens=1, do_sample=True, pad_token_id=0)
            out.append(time.perf_counter() - started)
    return out[1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ours = statistics.median(tinkerd_latencies(args.repeats))
    peer = statistics.median(peft_reload_latencies(args.repeats))
    emit("weights_to_sampler", tinkerd_ms=ours * 1e3, peft_save_reload_ms=peer * 1e3, speedup=peer / ours)


if __name__ == "__main__":
    main()
