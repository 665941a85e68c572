"""FSDP2 trainer groups: one base model sharded over N processes, driven like one `LocalTrainer`.

`FsdpTrainerGroup` starts N rank processes (torch.distributed, gloo here; NCCL is the GPU
backend), each loading the base model as a `ModelRuntime` (the LoRA wrappers, which hold the
tenants' adapter slots, are installed at that point) and only then sharding it with FSDP2
(`shard_base_model`). Each rank runs an ordinary `LocalTrainer` over its sharded runtime. The
group object, in the caller's process, sends each call to rank 0 over a pipe; rank 0 is the
group's entry point: it broadcasts the call to every rank, all ranks run the same step on the
same rows (every forward all-gathers each decoder layer's shards, in lockstep), and the result
comes back from rank 0. After every call the ranks report how it ended; if they disagree the group
is declared diverged (a server error) instead of carrying on with replicas that differ.

How multi-tenant LoRA coexists with sharding (the choice, and why):
- Only the frozen base is sharded: each decoder layer is one FSDP unit and the backbone (token
  embeddings, final norm) is the root unit. The LM head's weight stays whole on every rank
  (`ignored_params`): the runtime calls the head apart from the backbone, chunk by chunk, and a
  tied head shares its weight with the embeddings, which one FSDP unit cannot share with another.
- LoRA A/B stay replicated, whole, on every rank. They are small next to the base (rank 32 on every
  linear: ~1 % of an 8B model, ~7 % of SmolLM2-135M); tenants come and go at run time while FSDP2
  only shards parameters that exist when `fully_shard` runs; and each tenant keeping its own
  tensors and its own AdamW makes slot isolation structural (one tenant's optim_step cannot touch
  another's weights, no masked update of a shared stacked tensor). Since every rank computes the
  same rows from the same gathered weights, the replicas' gradients and updates are identical
  without any all-reduce, and export, checkpoints and sampler weights are written by rank 0 from
  its own replica: nothing to gather. `replica_digests` checks that the replicas still agree.
- What this buys is memory (each rank keeps 1/N of the decoder weights between layers), not
  speed: every rank does the whole batch's compute. Splitting rows across ranks (data parallel,
  with an all-reduce of LoRA gradients before optim_step) would need every rank to run the same
  number of micro-batches; not done. `bench/fsdp_group.py` measures both on SmolLM2.

Knows nothing about ordering, fencing or adapter versions: wrap the group in `FencedTrainer` and
`VersionedTrainer` like any `Trainer` (`backends.assemble` does both for `tinkerd serve
--trainer-ranks N`). `snapshot_for_sampler` is not offered (a sampler cannot run on one rank of a
sharded model); `VersionedTrainer` writes version folders through `save_sampler_weights` instead. Paths
passed to `load_state` must be readable by every rank (shared storage across machines); files are
written by rank 0 only. Each rank loads the whole base model before sharding it (building on the
meta device and loading shards is the large-model path; not done here).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import tempfile
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from tinkerd.engine.interface import AdapterSpec, BaseModelInfo, forward_backward_one
from tinkerd.protocol.types import AdamParams, ForwardBackwardCall, ForwardBackwardResult

COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # a rank that stops answering fails the group after this long
START_TIMEOUT_SECONDS = 600.0
WRITTEN_BY_RANK_0 = {"save_state", "save_sampler_weights"}
TRAINER_METHODS = {"create_adapter", "drop_adapter", "forward_backward_many", "optim_step", "save_state",
                   "save_sampler_weights", "load_state"}
PROBES = {"adapter_digest", "base_shard_numel"}  # every rank answers; the caller gets the list
STOP = "stop"
FORKSERVER_PRELOAD = ["torch.distributed.fsdp", "transformers.modeling_utils", "tinkerd.engine.trainer",
                      "tinkerd.backends.fsdp_group"]


class GroupLost(RuntimeError):
    """A rank of the group died or stopped answering; the adapters it held are gone (a server error)."""


class GroupDiverged(RuntimeError):
    """The ranks ended one call differently; their replicas can no longer be trusted (a server error)."""


def shard_base_model(runtime, mesh) -> None:
    """FSDP2 over the frozen base: one unit per decoder layer, the backbone as root, the LM head kept whole.

    Call after `ModelRuntime` wrapped the target linears (their adapter dictionaries are not
    parameters, so adapters added later are never sharded)."""
    from torch.distributed.fsdp import fully_shard

    layers = getattr(runtime.backbone, "layers", None)
    if layers is None:
        raise ValueError(f"{runtime.name}: the backbone has no `layers` list to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(runtime.backbone, mesh=mesh, ignored_params=set(runtime.head.parameters()))


class RankMember:
    """What one rank does with a broadcast call: run it on its `LocalTrainer`, or answer a probe."""

    def __init__(self, rank: int, trainer) -> None:
        self.rank = rank
        self.trainer = trainer

    def run(self, method: str, args: tuple) -> Any:
        if method in PROBES:
            return getattr(self, method)(*args)
        if method not in TRAINER_METHODS:
            raise ValueError(f"not a group method: {method}")
        if method in WRITTEN_BY_RANK_0 and self.rank != 0:
            self.trainer._adapter(args[0])  # fail as rank 0 does when the adapter is missing; write nothing
            return None
        return getattr(self.trainer, method)(*args)

    def adapter_digest(self, model_id: str) -> str:
        """sha256 of this rank's replica of adapter `model_id` (weights as exported)."""
        digest = hashlib.sha256()
        runtime = self.trainer._adapter(model_id).runtime
        for name, tensor in sorted(runtime.lora.export(model_id).items()):
            digest.update(name.encode())
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def base_shard_numel(self) -> tuple[int, int]:
        """(elements of the base weights held here, elements of the whole base) over every served model."""
        from torch.distributed.tensor import DTensor

        local = whole = 0
        for runtime in self.trainer.runtimes.values():
            for p in runtime.model.parameters():
                local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                whole += p.numel()
        return local, whole


def _outcome(result: Any, error: BaseException | None) -> tuple:
    """How a call ended, comparable across ranks (per request for forward_backward_many)."""
    if error is not None:
        return ("error", type(error).__name__, str(error))
    if isinstance(result, list):
        return tuple(type(r).__name__ + (f": {r}" if isinstance(r, Exception) else "") for r in result)
    return ("ok",)


def run_everywhere(member: RankMember, world: int, method: str, args: tuple) -> tuple[Any, BaseException | None]:
    """Rank 0: broadcast one call, run it here, check that every rank ended it the same way (a file
    written by rank 0 alone may fail there alone: the replicas are unchanged either way).

    Returns (rank 0's result, or for a probe every rank's answer by rank; the call's own error or
    None). Raises only when the group itself failed: a collective broke (a rank died) or the ranks
    disagree (GroupDiverged)."""
    import torch.distributed as dist

    dist.broadcast_object_list([(method, args)], src=0)
    result, error = _run_here(member, method, args)
    reports: list = [None] * world
    dist.gather_object((_outcome(result, error), result if method in PROBES else None), reports, dst=0)
    if method not in WRITTEN_BY_RANK_0 and len({outcome for outcome, _ in reports}) > 1:
        raise GroupDiverged(f"ranks ended {method} differently: {[outcome for outcome, _ in reports]}")
    return ([answer for _, answer in reports] if method in PROBES else result), error


def follow(member: RankMember) -> None:
    """Ranks 1..N-1: run every call rank 0 broadcasts, report how it ended, until told to stop."""
    import torch.distributed as dist

    while True:
        box: list = [None]
        dist.broadcast_object_list(box, src=0)
        method, args = box[0]
        if method == STOP:
            return
        result, error = _run_here(member, method, args)
        dist.gather_object((_outcome(result, error), result if method in PROBES else None), None, dst=0)


def _run_here(member: RankMember, method: str, args: tuple) -> tuple[Any, BaseException | None]:
    try:
        return member.run(method, args), None
    except Exception as exc:  # noqa: BLE001 - a request's own error travels back to the caller
        return None, exc


def _picklable(error: BaseException) -> BaseException:
    """The error itself if it can cross the pipe, else a RuntimeError with its type and message."""
    try:
        pickle.dumps(error)
        return error
    except Exception:  # noqa: BLE001 - whatever pickling raises, the caller still gets the message
        return RuntimeError(f"{type(error).__name__}: {error}")


def _rank_main(rank: int, world: int, init_method: str, loader: Callable[..., dict], loader_args: tuple,
               threads: int, conn) -> None:
    """One rank process: join the group, load and shard the base model(s), then lead (rank 0) or follow.

    Ctrl-C in a terminal reaches every process of the foreground group: ranks ignore it, so the
    server can still use them while it shuts down (it stops them, and they exit when it dies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from tinkerd.engine.threads import configure_threads

    configure_threads(threads)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tinkerd.engine.kernels.memory import release_freed_memory
    from tinkerd.engine.trainer import LocalTrainer

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        mesh = init_device_mesh("cpu", (world,))
        runtimes = loader(*loader_args)
        for runtime in runtimes.values():
            shard_base_model(runtime, mesh)
        release_freed_memory()  # the whole weights each rank loaded before sharding
        member = RankMember(rank, LocalTrainer(runtimes))
        if rank != 0:
            follow(member)
            return
        conn.send(("ready", member.trainer.base_models()))
        while True:
            method, args = conn.recv()
            if method == STOP:
                dist.broadcast_object_list([(STOP, ())], src=0)
                return
            try:
                result, error = run_everywhere(member, world, method, args)
            except Exception as exc:
                conn.send(("lost", f"{type(exc).__name__}: {exc}"))  # this rank cannot go on either
                raise
            conn.send(("error", _picklable(error)) if error is not None else ("ok", result))
    finally:
        dist.destroy_process_group()


class FsdpTrainerGroup:
    """A `Trainer` (without `snapshot_for_sampler`) backed by `world_size` rank processes on this machine.

    `loader(*loader_args)` runs in every rank and returns {base model name: ModelRuntime}, like the
    Ray actor's loader; it must be importable by name (ranks are started from a fork server). One call at a time.
    """

    def __init__(self, world_size: int, loader: Callable[..., dict], loader_args: tuple = (),
                 threads_per_rank: int = 1, start_timeout: float = START_TIMEOUT_SECONDS) -> None:
        import multiprocessing

        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        # Ranks fork from a fork server that imported torch, transformers and the trainer once per
        # process (a second group starts without re-importing); unlike plain fork it never copies a
        # parent's threads or torch state.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(FORKSERVER_PRELOAD)
        self.world_size = world_size
        self._lock = threading.Lock()
        self._rendezvous = tempfile.NamedTemporaryFile(prefix="tinkerd-fsdp-", delete=False)
        self._rendezvous.close()
        os.unlink(self._rendezvous.name)  # the file store creates it; it must not exist yet
        self._conn, child = context.Pipe()
        self._ranks = [
            context.Process(target=_rank_main, name=f"tinkerd-fsdp-rank{rank}", daemon=True,
                            args=(rank, world_size, f"file://{self._rendezvous.name}", loader, loader_args,
                                  threads_per_rank, child if rank == 0 else None))
            for rank in range(world_size)
        ]
        for process in self._ranks:
            process.start()
        child.close()
        try:
            self._base_models: list[BaseModelInfo] = self._receive(start_timeout, "start")
        except BaseException:
            self.close()
            raise

    # the Trainer protocol

    def base_models(self) -> list[BaseModelInfo]:
        return list(self._base_models)

    def create_adapter(self, model_id: str, base_model: str, spec: AdapterSpec) -> None:
        return self._call("create_adapter", model_id, base_model, spec)

    def drop_adapter(self, model_id: str) -> None:
        return self._call("drop_adapter", model_id)

    def forward_backward(self, call: ForwardBackwardCall) -> ForwardBackwardResult:
        return forward_backward_one(self, call)

    def forward_backward_many(self, calls: list[ForwardBackwardCall]) -> list[ForwardBackwardResult | Exception]:
        return self._call("forward_backward_many", calls)

    def optim_step(self, model_id: str, params: AdamParams) -> dict[str, float]:
        return self._call("optim_step", model_id, params)

    def save_sampler_weights(self, model_id: str, directory: Path) -> None:
        return self._call("save_sampler_weights", model_id, Path(directory))

    def save_state(self, model_id: str, directory: Path, with_gradients: bool = False) -> None:
        return self._call("save_state", model_id, Path(directory), with_gradients)

    def load_state(self, model_id: str, base_model: str | None, directory: Path, with_optimizer: bool) -> AdapterSpec:
        return self._call("load_state", model_id, base_model, Path(directory), with_optimizer)

    # the group's own

    def replica_digests(self, model_id: str) -> list[str]:
        """Each rank's sha256 of adapter `model_id`, by rank: all equal while the replicas agree."""
        return self._call("adapter_digest", model_id)

    def base_shard_numel(self) -> list[tuple[int, int]]:
        """Per rank: (base weight elements held there, elements of the whole base)."""
        return self._call("base_shard_numel")

    @property
    def pids(self) -> list[int | None]:
        """The rank processes' ids, by rank."""
        return [p.pid for p in self._ranks]

    def __enter__(self) -> "FsdpTrainerGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every rank (at once if the group is broken) and wait for them."""
        with self._lock:
            if all(p.is_alive() for p in self._ranks):
                try:
                    self._conn.send((STOP, ()))
                except OSError:
                    pass
            for process in self._ranks:
                process.join(timeout=30)
            for process in self._ranks:
                if process.is_alive():
                    process.kill()
                    process.join()
            self._conn.close()
            if os.path.exists(self._rendezvous.name):
                os.unlink(self._rendezvous.name)

    def _call(self, method: str, *args: Any) -> Any:
        with self._lock:
            try:
                self._conn.send((method, args))
            except OSError as exc:
                raise GroupLost(f"the FSDP group is gone ({exc})") from exc
            return self._receive(None, method)

    def _receive(self, timeout: float | None, what: str) -> Any:
        """Rank 0's answer; GroupLost as soon as any rank has died."""
        waited = 0.0
        while not self._conn.poll(0.5):
            waited += 0.5
            if not all(p.is_alive() for p in self._ranks):
                self._fail(what)
            if timeout is not None and waited >= timeout:
                self._fail(what, f"no answer in {timeout:.0f} s")
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            self._fail(what, "rank 0 closed its pipe")
        if status == "lost":
            self._fail(what, value)
        if status == "error":
            raise value
        return value

    def _fail(self, what: str, reason: str = "") -> None:
        """Stop the remaining ranks and raise GroupLost naming the ranks that had died."""
        for process in self._ranks:
            process.join(timeout=1.0)  # a rank that just failed a collective may still be exiting
        dead = [p.name for p in self._ranks if not p.is_alive()]
        for process in self._ranks:
            if process.is_alive():
                process.kill()
        causes = ", ".join(filter(None, [f"{' and '.join(dead)} died" if dead else "", reason]))
        raise GroupLost(f"FSDP trainer group lost during {what}: {causes}")


def fsdp_trainer(ranks: int, specs: list[str | None], model_cache: Path, dtype: str, compile_norms: bool,
                 threads: int) -> "FsdpTrainerGroup":
    """`tinkerd serve --trainer-ranks N`: a group over the served base models, each rank loading them on CPU
    (`engine.runtime.load_runtimes`, without packed GEMMs: FSDP owns the shards)."""
    from tinkerd.engine.runtime import load_runtimes

    return FsdpTrainerGroup(ranks, load_runtimes, (list(specs), str(model_cache), dtype, "cpu", compile_norms, "off"),
                            threads_per_rank=threads)
