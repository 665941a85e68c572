"""SDK + HTTP overhead: the same training step through the tinker SDK vs the engine in-process.

    python -m bench.overhead [--batch 8] [--seq 256]
"""

from __future__ import annotations

import argparse

from bench.common import alternating_medians, embedded_model_files, emit
from bench.train import random_batch, tinkerd_step


def in_process_step(tokens, rank: int):
    """The same step calling tinkerd's engine directly, no SDK, HTTP or scheduler."""
    import numpy as np

    from tinkerd.engine.interface import AdapterSpec
    from tinkerd.engine.runtime import ModelRuntime
    from tinkerd.engine.trainer import LocalTrainer
    from tinkerd.protocol.types import AdamParams, Datum, ForwardBackwardCall

    runtime = ModelRuntime.load(embedded_model_files())
    trainer = LocalTrainer({runtime.name: runtime})
    trainer.create_adapter("m", runtime.name, AdapterSpec(rank=rank, seed=0, train_unembed=False))
    data = [Datum(row[:-1].astype(np.int64), {"target_tokens": row[1:].astype(np.int64),
                                              "weights": np.ones(len(row) - 1, dtype=np.float32)}) for row in tokens]

    def step() -> None:
        trainer.forward_backward(ForwardBackwardCall("m", 1, "cross_entropy", {}, False, data))
        trainer.optim_step("m", AdamParams(learning_rate=1e-4))

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    tokens = random_batch(49152, args.batch, args.seq)
    with tinkerd_step(tokens, 32) as sdk_step:  # the two arms in turns: see alternating_medians
        seconds = alternating_medians({"sdk": sdk_step, "local": in_process_step(tokens, 32)}, args.steps)
    sdk, local = seconds["sdk"], seconds["local"]
    emit("overhead", batch=args.batch, seq=args.seq, sdk_step_s=sdk, in_process_step_s=local,
         overhead_fraction=sdk / local - 1.0)


if __name__ == "__main__":
    main()
