"""Multi-tenant training: N SDK clients, each with its own LoRA, each sending batch 1 x 256 at once.

    python -m bench.multitenant [--tenants 1,2,4,8] [--steps 3]

Their forward/backward requests land in the same engine batch, so the aggregate tokens/s should
approach one client sending batch N (the ideal, measured in the same run); a server that
time-slices tenants runs one batch-1 step after another (the lone batch-1 client's speed, which on
a GPU is about 1/N of the ideal; on a CPU small batches are less wasteful, so both ratios are given).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import MODEL_CACHE, emit

EMBEDDED = "HuggingFaceTB/SmolLM2-135M-Instruct"


def datum(types, row: np.ndarray):
    return types.Datum(model_input=types.ModelInput.from_ints(row[:-1].tolist()),
                       loss_fn_inputs={"target_tokens": row[1:].tolist(), "weights": [1.0] * (len(row) - 1)})


def run_clients(service, types, batches: list[list], steps: int) -> float:
    """Each client trains `steps` steps on its batch concurrently; returns aggregate tokens/s."""
    clients = [service.create_lora_training_client(base_model=EMBEDDED, rank=32, seed=i).result()
               for i in range(len(batches))]

    def train(client, data) -> None:
        for _ in range(steps):
            fwd = client.forward_backward(data, "cross_entropy")
            opt = client.optim_step(types.AdamParams(learning_rate=1e-4))
            fwd.result()
            opt.result()

    for client, data in zip(clients, batches):  # warm-up
        client.forward_backward(data, "cross_entropy").result()
    with ThreadPoolExecutor(len(clients)) as pool:
        started = time.perf_counter()
        list(pool.map(lambda cd: train(*cd), zip(clients, batches)))
        seconds = time.perf_counter() - started
    tokens = steps * sum(len(d.model_input.to_ints()) for data in batches for d in data)
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", default="1,2,4,8")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-gather-ms", type=float, default=None, help="the server's (default: its own)")
    args = parser.parse_args()
    import tinker
    from tinker import types

    from tinkerd.local_server import LocalServer

    counts = [int(n) for n in args.tenants.split(",")]
    rng = np.random.default_rng(0)
    rows = rng.integers(3, 49152, size=(max(counts), args.seq + 1))
    figures: dict[str, float] = {"seq": args.seq}
    extra = [] if args.batch_gather_ms is None else ["--batch-gather-ms", str(args.batch_gather_ms)]
    with tempfile.TemporaryDirectory() as tmp, LocalServer(Path(tmp), *extra, model_cache=MODEL_CACHE) as server:
        service = tinker.ServiceClient(base_url=server.url, api_key="tml-bench")
        for n in counts:
            ideal = run_clients(service, types, [[datum(types, r) for r in rows[:n]]], args.steps)
            tenants = run_clients(service, types, [[datum(types, r)] for r in rows[:n]], args.steps)
            figures[f"tenants{n}_tok_s"] = tenants
            figures[f"one_client_batch{n}_tok_s"] = ideal
            figures[f"tenants{n}_vs_ideal"] = tenants / ideal
            # serving tenants one after another gives each step the speed of a lone batch-1 client
            figures[f"tenants{n}_vs_time_slicing"] = tenants / figures.get("tenants1_tok_s", tenants)
    emit("multitenant", **figures)


if __name__ == "__main__":
    main()
