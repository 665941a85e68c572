"""What an FSDP2 trainer group buys and costs on SmolLM2 (bf16): a group of 2 ranks against a group of 1
(the same code, nothing sharded), 1 torch thread per rank, steps alternating between the two so that
load from other processes hits both alike. Per group: start time, base-weight MB each rank holds,
each rank's resident memory after start and after training, and the median LoRA training step (forward_backward +
optim_step). RMSNorm runs eager on both sides.

    python -m bench.fsdp_group [--batch 4] [--seq 128] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from bench.common import MODEL_CACHE, emit
from bench.ray_overhead import _data, _stepper
from bench.train import random_batch


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def measure(tokens: np.ndarray, rank: int, steps: int) -> dict[str, float]:
    from tinkerd.backends.fsdp_group import FsdpTrainerGroup
    from tinkerd.engine.runtime import load_runtimes

    groups, figures = {}, {}
    try:
        for world in (1, 2):
            started = time.perf_counter()
            groups[world] = FsdpTrainerGroup(world, load_runtimes, ([None], str(MODEL_CACHE), "bf16", "cpu", False, "off"))
            figures[f"ranks{world}_ready_s"] = time.perf_counter() - started
            figures[f"ranks{world}_rss_mb_per_rank_at_start"] = max(_rss_mb(pid) for pid in groups[world].pids)
        (name,) = [m.name for m in groups[1].base_models()]
        data = _data(tokens)
        steppers = {world: _stepper(group, name, rank, data) for world, group in groups.items()}
        times: dict[int, list[float]] = {1: [], 2: []}
        for i in range(steps + 1):
            for world, step in steppers.items():
                t0 = time.perf_counter()
                step()
                if i:  # the first round warms up
                    times[world].append(time.perf_counter() - t0)
        for world, group in groups.items():
            held = [local for local, _ in group.base_shard_numel()]
            figures[f"ranks{world}_base_mb_per_rank"] = max(held) * 2 / 2**20  # bf16
            figures[f"ranks{world}_rss_mb_per_rank_trained"] = max(_rss_mb(pid) for pid in group.pids)
            figures[f"ranks{world}_step_s"] = statistics.median(times[world])
        return figures
    finally:
        for group in groups.values():
            group.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    figures = measure(random_batch(49152, args.batch, args.seq), 32, args.steps)
    emit("fsdp_group", batch=args.batch, seq=args.seq, lora_rank=32, **figures,
         step_ratio_2_vs_1=figures["ranks2_step_s"] / figures["ranks1_step_s"])


if __name__ == "__main__":
    main()
