"""A DPO step with a custom loss, server-side (`create_custom_loss` + one forward_backward) vs the SDK's
client-side path (a forward, the loss on the client, then a second forward_backward), in the same run on
the same server, two training runs from the same seed, timed in turns.

    python -m bench.custom_loss [--pairs 4] [--seq 96] [--steps 3]

Each datum holds a chosen and a rejected completion after each other (masks pick them) with reference
logprobs and a rank-0 beta, the loss -logsigmoid(beta * margin). Prints one JSON line: both step times,
their ratio, and how far the two paths' first-step losses are apart (they should agree to fp32 rounding).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from bench.common import MODEL_CACHE, alternating_medians, compute_dtype, emit

EMBEDDED = "HuggingFaceTB/SmolLM2-135M-Instruct"


def dpo(logprobs, ref_logprobs, chosen_mask, rejected_mask, beta):
    import torch.nn.functional as F

    delta = logprobs - ref_logprobs
    margin = (delta * chosen_mask).sum() - (delta * rejected_mask).sum()
    return -F.logsigmoid(beta * margin), {"custom/margin:mean": margin.detach()}


def dpo_batch(pairs: int, seq: int, vocab: int = 49152):
    import torch
    from tinker import types

    rng = np.random.default_rng(0)
    data = []
    for _ in range(pairs):
        tokens = rng.integers(10, vocab, 2 * seq + 1)
        chosen = (np.arange(2 * seq) < seq).astype(np.float32)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1].tolist()), loss_fn_inputs={
            "target_tokens": tokens[1:].astype(np.int64), "ref_logprobs": rng.uniform(-12, -8, 2 * seq).astype(np.float32),
            "chosen_mask": chosen, "rejected_mask": 1 - chosen, "beta": torch.tensor(0.1)}))
    return data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seq", type=int, default=96, help="tokens per completion (a datum holds two)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    import tinker
    from tinker import types

    from tinkerd.local_server import LocalServer

    data = dpo_batch(args.pairs, args.seq)
    with tempfile.TemporaryDirectory() as tmp, LocalServer(Path(tmp), model_cache=MODEL_CACHE) as server:
        service = tinker.ServiceClient(base_url=server.url, api_key="tml-bench")
        handle = service.create_custom_loss(dpo, {"logprobs": 1, "ref_logprobs": 1, "chosen_mask": 1,
                                                  "rejected_mask": 1, "beta": 0}).result()
        arms = {"server": handle, "client": dataclasses.replace(handle, loss_id=None)}
        runs = {name: service.create_lora_training_client(base_model=EMBEDDED, rank=16, seed=0).result()
                for name in arms}
        first = {name: runs[name].forward_backward_custom(data, arms[name]).result().metrics["loss:sum"]
                 for name in arms}

        def step(name):
            def run() -> None:
                fwd = runs[name].forward_backward_custom(data, arms[name])
                opt = runs[name].optim_step(types.AdamParams(learning_rate=1e-5))
                fwd.result()
                opt.result()
            return run

        seconds = alternating_medians({name: step(name) for name in arms}, args.steps)
    emit("custom_loss", dtype=compute_dtype(), pairs=args.pairs, tokens_per_datum=2 * args.seq,
         server_side_step_s=seconds["server"], client_side_step_s=seconds["client"],
         server_over_client=seconds["server"] / seconds["client"],
         first_loss_abs_diff=abs(first["server"] - first["client"]), first_loss=first["server"])


if __name__ == "__main__":
    main()
