"""What every benchmark needs: the embedded model's files, median timers, and the JSON line."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = Path(os.environ.get("TINKERD_BENCH_MODEL_CACHE", REPO / ".tinkerd" / "test-models"))


def compute_dtype() -> str:
    """The dtype tinkerd's `--dtype auto` picks on this machine (bf16 only with native bf16 matmuls);
    the peers run in it too, so each side gets the best this hardware offers."""
    from tinkerd.engine.runtime import resolve_dtype

    return resolve_dtype("auto")


def embedded_model_files():
    from tinkerd.engine.base_models import resolve_base_model

    return resolve_base_model(None, MODEL_CACHE)


def median_seconds(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def alternating_medians(steps: dict[str, Callable[[], object]], repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each named step, timed in turns (a, b, a, b, ...) after each one's warm-up, so a
    machine that slows down or speeds up mid-run (a shared VM) moves every arm alike and ratios hold."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def memory_read_gb_s(gib: float = 1.0) -> float:
    """This machine's memory read bandwidth as torch sees it, over data far bigger than any cache: the faster of
    a sum over a 1 GiB tensor and a one-row GEMM against a 1 GiB prepacked weight (oneDNN's GEMV streams the
    weight ~10 % faster than the sum here). llama.cpp's F32 decode still reads its weights faster than either
    (bench/llama_cpp.py), so the figures `vs_roofline` divide by are a floor of what the memory allows."""
    import torch

    from tinkerd.engine.kernels.packed_gemm import pack_weight, packed_linear

    x = torch.ones(int(gib * 2**28))  # fp32
    summed = x.numel() * 4 / median_seconds(x.sum, repeats=5) / 1e9
    del x
    if not torch.backends.mkldnn.is_available():
        return summed
    side = int((gib * 2**28) ** 0.5)
    weight = pack_weight(torch.ones(side, side))
    row = torch.ones(1, side)
    return max(summed, side * side * 4 / median_seconds(lambda: packed_linear(row, weight, None), repeats=5) / 1e9)


def machine() -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"cpu": platform.processor() or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(), "commit": commit}


def emit(name: str, **figures) -> None:
    print(json.dumps({"bench": name, **{k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()},
                      "machine": machine()}), flush=True)
