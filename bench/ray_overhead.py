"""What `--engine ray` costs: the same SmolLM2 LoRA training step through the Ray engine actor vs the
embedded engine in this process (alternating, same run), plus an empty actor round trip and a
one-token decode step through the actor. Both sides get 2 torch threads (the actor reserves 2
CPUs). Needs tinkerd[ray].

    python -m bench.ray_overhead [--batch 4] [--seq 128] [--steps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import numpy as np

from bench.common import MODEL_CACHE, emit
from bench.train import random_batch

THREADS = 2


def _data(tokens: np.ndarray):
    from tinkerd.protocol.types import Datum

    return [Datum(row[:-1].astype(np.int64), {"target_tokens": row[1:].astype(np.int64),
                                              "weights": np.ones(len(row) - 1, dtype=np.float32)}) for row in tokens]


def _stepper(trainer, name: str, rank: int, data) -> Callable[[], None]:
    from tinkerd.engine.interface import AdapterSpec
    from tinkerd.protocol.types import AdamParams, ForwardBackwardCall

    trainer.create_adapter("m", name, AdapterSpec(rank=rank, seed=0, train_unembed=False))

    def step() -> None:
        trainer.forward_backward(ForwardBackwardCall("m", 0, "cross_entropy", {}, False, data))
        trainer.optim_step("m", AdamParams(learning_rate=1e-4))

    return step


def measure(tokens: np.ndarray, rank: int, steps: int) -> dict[str, float]:
    """Ray and in-process steps alternate, so load from other processes hits both alike."""
    import ray

    from tinkerd.engine.interface import AdapterRef, SampleTask
    from tinkerd.backends.ray_actor import load_base_model
    from tinkerd.backends.ray_engine import ActorPlacement, RaySampler, RayTrainer, remove, start_or_attach
    from tinkerd.protocol.types import SamplingParams

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = time.perf_counter()
    ray.init(num_cpus=THREADS, include_dashboard=False, object_store_memory=256 * 1024 * 1024, logging_level="warning")
    placement = ActorPlacement("bench-ray-overhead", load_base_model, (None, str(MODEL_CACHE), "auto", "cpu", THREADS),
                               num_cpus=THREADS)
    try:
        trainer = RayTrainer([start_or_attach(placement)])
        ready = time.perf_counter() - started
        (name,) = [m.name for m in trainer.base_models()]
        handle = trainer.handle(name)
        trips = []
        for _ in range(50):
            t0 = time.perf_counter()
            ray.get(handle.describe.remote())
            trips.append(time.perf_counter() - t0)
        sampler = RaySampler(trainer)
        sampler.submit(SampleTask("decode", AdapterRef(None, name), [1, 2, 3], 1,
                                     SamplingParams(max_tokens=40, temperature=0.0, stop_at_eos=False)))
        decode = []
        while sampler.has_work():
            t0 = time.perf_counter()
            sampler.step()
            decode.append(time.perf_counter() - t0)
        data = _data(tokens)
        remote_step = _stepper(trainer, name, rank, data)
        local_step = _stepper(*_local_trainer(), rank, data)
        times: dict[str, list[float]] = {"ray": [], "local": []}
        for i in range(steps + 1):
            for label, step in (("ray", remote_step), ("local", local_step)):
                t0 = time.perf_counter()
                step()
                if i:  # the first round warms up
                    times[label].append(time.perf_counter() - t0)
        return {"ray_ready_s": ready, "ray_round_trip_ms": statistics.median(trips) * 1e3,
                "ray_decode_step_ms": statistics.median(decode[2:]) * 1e3,
                "ray_step_s": statistics.median(times["ray"]), "in_process_step_s": statistics.median(times["local"])}
    finally:
        remove(placement.key)
        ray.shutdown()


def _local_trainer():
    import torch

    from bench.common import embedded_model_files
    from tinkerd.engine.runtime import ModelRuntime
    from tinkerd.engine.trainer import LocalTrainer

    torch.set_num_threads(THREADS)
    runtime = ModelRuntime.load(embedded_model_files())
    return LocalTrainer({runtime.name: runtime}), runtime.name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    figures = measure(random_batch(49152, args.batch, args.seq), 32, args.steps)
    emit("ray_overhead", batch=args.batch, seq=args.seq, **figures,
         step_overhead_fraction=figures["ray_step_s"] / figures["in_process_step_s"] - 1.0)


if __name__ == "__main__":
    main()
