"""LoRA training throughput: tinkerd through the SDK vs a hand-written HF transformers + PEFT loop.

    python -m bench.train [--batch 8] [--seq 256] [--rank 32] [--steps 3]

Same model (the embedded SmolLM2-135M), LoRA rank 32 on every linear layer, AdamW, batch 8 x 256
random tokens with the loss on every token. tinkerd runs as a real server driven by the tinker
SDK; the peer is the loop a user would write (bf16 autocast where this CPU multiplies bf16 natively,
else plain fp32: the best of HF + PEFT on the hardware at hand, in the dtype tinkerd's `--dtype auto`
picks), and TRL's SFTTrainer (the `bench` extra installs it). Reports train tokens/s (median step
after a warm-up; tinkerd's and the HF + PEFT loop's steps timed in turns, TRL's after), ratios, and
MFU against this machine's matmul peak in that dtype, measured in the same run (4 x params FLOPs
per token: forward plus activation gradients; the base weights get no weight gradients).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from bench.common import MODEL_CACHE, alternating_medians, compute_dtype, embedded_model_files, emit, median_seconds

EMBEDDED = "HuggingFaceTB/SmolLM2-135M-Instruct"


def peak_flops(dtype: torch.dtype, n: int = 2048) -> float:
    """The faster of torch's matmul (MKL on CPU) and oneDNN with a prepacked operand (what
    `--packed-gemms` uses): on an AMD CPU MKL alone understates what the machine multiplies."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, repeats=5, warmup=2)
    if a.device.type == "cpu" and torch.backends.mkldnn.is_available():
        from tinkerd.engine.kernels.packed_gemm import pack_weight, packed_linear

        packed = pack_weight(b)
        onednn = median_seconds(lambda: packed_linear(a, packed, None), repeats=5, warmup=2)
        seconds = min(seconds, onednn)
    return 2 * n**3 / seconds


def random_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(batch, seq + 1))


@contextlib.contextmanager
def tinkerd_step(tokens: np.ndarray, rank: int) -> Iterator[Callable[[], None]]:
    """One training step (forward_backward + optim_step) through the SDK against a local tinkerd."""
    import tinker
    from tinker import types

    from tinkerd.local_server import LocalServer

    data = [types.Datum(model_input=types.ModelInput.from_ints(row[:-1].tolist()),
                        loss_fn_inputs={"target_tokens": row[1:].tolist(), "weights": [1.0] * (len(row) - 1)})
            for row in tokens]
    with tempfile.TemporaryDirectory() as tmp, LocalServer(Path(tmp), model_cache=MODEL_CACHE) as server:
        training = tinker.ServiceClient(base_url=server.url, api_key="tml-bench").create_lora_training_client(
            base_model=EMBEDDED, rank=rank, seed=0, train_unembed=False).result()  # PEFT all-linear: no lm_head

        def step() -> None:
            fwd = training.forward_backward(data, "cross_entropy")
            opt = training.optim_step(types.AdamParams(learning_rate=1e-4))
            fwd.result()
            opt.result()

        yield step


def hf_peft_step(folder: Path, tokens: np.ndarray, rank: int, bf16: bool) -> Callable[[], None]:
    """One step of the loop a user would write with HF transformers + PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=32, target_modules=targets, lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = torch.from_numpy(tokens)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def trl_sft_step_seconds(folder: Path, tokens: np.ndarray, rank: int, steps: int, bf16: bool) -> float:
    """TRL's SFTTrainer on the same pre-tokenized rows (the same dtype choice, the same LoRA targets)."""
    import time

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.started)

    rows = [{"input_ids": row[:-1].tolist()} for row in tokens] * (steps + 1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(output_dir=tmp, per_device_train_batch_size=len(tokens), max_length=tokens.shape[1],
                           max_steps=steps + 1, learning_rate=1e-4, bf16=bf16, use_cpu=True, packing=False,
                           report_to="none", save_strategy="no", logging_strategy="no", dataloader_num_workers=0)
        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), args=config,
                             train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(folder),
                             peft_config=LoraConfig(r=rank, lora_alpha=32, target_modules=targets, lora_dropout=0.0),
                             callbacks=[StepTimer()])
        trainer.train()
    return float(np.median(times[1:]))  # the first step warms up


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    files = embedded_model_files()
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(files.folder).vocab_size
    tokens = random_batch(vocab, args.batch, args.seq)
    n_tokens = args.batch * args.seq
    n_params = 134_515_008  # SmolLM2-135M incl. the tied unembedding
    dtype = compute_dtype()
    bf16 = dtype == "bf16"
    peak = peak_flops(torch.bfloat16 if bf16 else torch.float32)

    with tinkerd_step(tokens, args.rank) as ours_step:  # in turns with the peer: see alternating_medians
        seconds = alternating_medians({"tinkerd": ours_step,
                                       "hf": hf_peft_step(files.folder, tokens, args.rank, bf16)}, args.steps)
    ours, hf = n_tokens / seconds["tinkerd"], n_tokens / seconds["hf"]
    figures = dict(compute_dtype=dtype, tinkerd_tok_s=ours, hf_peft_tok_s=hf, ratio_vs_hf_peft=ours / hf)
    try:
        trl = n_tokens / trl_sft_step_seconds(files.folder, tokens, args.rank, args.steps, bf16)
        figures.update(trl_sft_tok_s=trl, ratio_vs_trl_sft=ours / trl)
    except ImportError as exc:  # `pip install -e .[bench]` brings TRL
        figures.update(trl_sft="not installed: " + str(exc))
    emit("train", batch=args.batch, seq=args.seq, rank=args.rank, **figures, peak_gflops=peak / 1e9,
         tinkerd_mfu=ours * 4 * n_params / peak, hf_peft_mfu=hf * 4 * n_params / peak)


if __name__ == "__main__":
    main()
