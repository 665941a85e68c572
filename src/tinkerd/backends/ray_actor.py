"""The Ray actor that serves one base model: the embedded engine's trainer and sampler, fenced.

One actor holds one `ModelRuntime`, a `FencedTrainer(LocalTrainer)` and a `LocalSampler` over the
same runtime, exactly as the embedded engine does in-process. The sampler lives in the trainer's
actor on purpose: `snapshot_for_sampler` freezes an adapter as an in-memory LoRA slot of the
runtime, and only a sampler over that same runtime can use it without writing a file (it also
keeps one copy of the base weights per model, not two). Training and decode steps share the
actor's single thread, as they share the engine thread in-process.

Torch is imported only inside the actor process (the front end imports this module to name the
actor class and must stay torch-free). Knows nothing about HTTP, the Store or ordering: callers
pass their epoch and the (model_id, seq_id) of each ordered operation, and the fence checks them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import ray

from tinkerd.engine.interface import SampleTask

log = logging.getLogger(__name__)


def load_base_model(spec: str | None, model_cache: str, dtype: str = "auto", device: str = "cpu",
                    threads: int | None = None, packed_gemms: str = "auto") -> dict[str, Any]:
    """The actor's loader for `tinkerd serve --engine ray`: resolve and load one `--base-model`."""
    from tinkerd.engine.threads import configure_threads

    log.info("engine actor: %s", configure_threads(threads))
    from tinkerd.engine.runtime import load_runtimes

    return load_runtimes([spec], Path(model_cache), dtype, device, packed_gemms=packed_gemms)


@ray.remote(max_task_retries=0)  # a training call is never re-run by Ray: the fence and the scheduler decide
class EngineActor:
    def __init__(self, loader: Callable[..., dict[str, Any]], *loader_args: Any) -> None:
        from tinkerd.backends.assemble import local_engine

        self.trainer, self.sampler = local_engine(loader(*loader_args))

    def claim(self) -> int:
        """A new epoch for a (re)attaching front end; calls naming an older one are refused from now on."""
        return self.trainer.fence.claim()

    def describe(self) -> dict:
        import ray

        return {"base_models": self.trainer.base_models(), "models": sorted(self.trainer.inner.adapters),
                "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": ray.get_gpu_ids(),
                **self.trainer.status()}

    def call(self, epoch: int, op: tuple[str, int] | None, method: str, *args: Any) -> Any:
        return self.trainer.call(epoch, op, method, *args)

    def sample_step(self, submits: list[SampleTask], cancels: list[str]) -> tuple[list, bool]:
        """Queue new requests, drop cancelled ones, advance every active row one token.

        Returns the finished requests and whether work remains. A request that fails before it
        reaches the sampler comes back as that request's error."""
        for request_id in cancels:
            self.sampler.cancel(request_id)
        for request in submits:
            self.sampler.submit(request)
        finished = self.sampler.step() if self.sampler.has_work() else []
        return finished, self.sampler.has_work()

    def exit_now(self) -> None:
        """Die at once, as a crash would (tests of recovery)."""
        os._exit(1)
