"""`--engine ray`: the front end's `Trainer` and `Sampler` as proxies to one Ray actor per base model.

Each base model gets a detached, named `EngineActor` (namespace `tinkerd`) in its own detached
one-bundle placement group, so a front end that restarts finds the same actors by name, claims
a new epoch (the old process, if it still runs, is fenced off) and sees the runs they hold.
The front end stays torch-free: arguments and results cross as pickled numpy/dataclass values.

What the proxies add to the actor calls:
- the caller's epoch and the (model_id, seq_id) of the ordered operation being run (`current_op`);
- errors come back as the engine raised them (a `BadRequest` stays a user error);
- a dead actor (crash, OOM kill, node loss) fails the calls in flight with `EngineLost` (a server
  error) and marks every run it held as lost: later requests on them fail at once with the
  reason instead of running on a restarted actor's empty state. Ray restarts the actor (the base
  model reloads); new runs can be created on it as soon as it is back.
- sample requests are buffered and shipped with the next `step`, one round trip per decode step
  and actor (actors step in parallel); `has_work` is answered locally.

Does not decide order, batch, retry or persist anything: that is the scheduler's and the Store's.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from tinkerd.backends.fencing import Restarted
from tinkerd.engine.interface import current_op
from tinkerd.engine.interface import (AdapterRef, AdapterSpec, BaseModelInfo, RunLost, SampleTask,
                                     forward_backward_one)
from tinkerd.protocol.types import AdamParams, BadRequest, ForwardBackwardCall, ForwardBackwardResult, SampleResult

log = logging.getLogger(__name__)

NAMESPACE = "tinkerd"
CLAIM_TIMEOUT_SECONDS = 300.0  # a restarting actor reloads its base model first


class EngineLost(RunLost):
    """The actor serving a run died; what it held in memory is gone (the front end rebuilds the run from its
    journal, or reports a `server` error)."""


@dataclass
class ActorPlacement:
    """How to start the actor of one base model, if it is not running yet."""

    key: str  # names the actor and its placement group: stable across front-end restarts
    loader: Callable[..., dict]  # runs in the actor, returns {name: ModelRuntime}
    loader_args: tuple = ()
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # one for a model on CUDA: Ray picks the node and sets CUDA_VISIBLE_DEVICES
    max_restarts: int = -1  # Ray brings a dead actor back (empty), on another node if its node is gone


def actor_name(key: str) -> str:
    return "engine-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


def attach(key: str):
    """The running actor of `key` (ValueError if there is none)."""
    return ray.get_actor(actor_name(key), namespace=NAMESPACE)


def start_or_attach(placement: ActorPlacement):
    """The named detached actor of `placement.key`, created (with its placement group) if absent."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from tinkerd.backends.ray_actor import EngineActor

    name = actor_name(placement.key)
    try:
        return attach(placement.key)
    except ValueError:
        pass
    group = next(iter(_placement_groups(name)), None)
    if group is None:
        bundle = {"CPU": placement.num_cpus, **({"GPU": placement.num_gpus} if placement.num_gpus else {})}
        group = placement_group([bundle], strategy="STRICT_PACK", name=name, lifetime="detached")
    ray.get(group.ready())
    return EngineActor.options(
        name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=placement.num_cpus,
        num_gpus=placement.num_gpus, max_restarts=placement.max_restarts, max_concurrency=1,
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0),
    ).remote(placement.loader, *placement.loader_args)


def remove(key: str) -> None:
    """Kill the actor of `key` and free its placement group (`tinkerd` never does this on its own)."""
    from ray.util.placement_group import remove_placement_group

    try:
        ray.kill(attach(key), no_restart=True)
    except ValueError:
        pass
    for group in _placement_groups(actor_name(key)):
        remove_placement_group(group)


def _placement_groups(name: str) -> list:
    """The live placement groups named `name`, whichever driver made them. A group's name lives in the namespace
    of the job that created it (not the actor's `tinkerd`), so `get_placement_group`, which looks in the caller's
    namespace only, misses a group that another front end or a test's subprocess driver created."""
    from ray.util.placement_group import PlacementGroup, placement_group_table

    return [PlacementGroup(ray.PlacementGroupID.from_hex(group_id))
            for group_id, info in placement_group_table().items() if info["name"] == name and info["state"] != "REMOVED"]


def connect(address: str | None, specs: list[str | None], model_cache: str, dtype: str = "auto",
            device: str = "cpu", threads: int | None = None,
            packed_gemms: str = "auto") -> tuple["RayTrainer", "RaySampler", str]:
    """`tinkerd serve --engine ray`: join (or start) the cluster, start or re-attach one actor per
    `--base-model`, and return the proxies plus a line for the log. An actor gets `threads` CPUs
    (default 1) and as many torch threads, and one GPU when `device` is CUDA."""
    import os

    from tinkerd.backends.ray_actor import load_base_model

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, namespace=NAMESPACE, logging_level="warning")
    else:  # a private cluster: its actors end with this process
        ray.init(address="local", namespace=NAMESPACE, include_dashboard=False,
                 object_store_memory=256 * 1024 * 1024, logging_level="warning")
    cpus = threads or 1
    gpus = 1.0 if device.startswith("cuda") else 0.0
    handles = [start_or_attach(ActorPlacement(f"{spec or 'embedded'}@{dtype}", load_base_model,
                                              (spec, model_cache, dtype, device, cpus, packed_gemms), num_cpus=cpus,
                                              num_gpus=gpus))
               for spec in specs]
    trainer = RayTrainer(handles)
    where = f"engine: {len(handles)} Ray actor(s) of {cpus} CPU(s) on {address or 'a private local cluster'}"
    return trainer, RaySampler(trainer), where


@dataclass
class _Actor:
    handle: Any
    epoch: int = 0
    base_models: list[BaseModelInfo] = field(default_factory=list)


class RayTrainer:
    """The `Trainer` protocol over the actors (base model name -> actor)."""

    def __init__(self, handles: list) -> None:
        self._actors: dict[str, _Actor] = {}
        self._lock = threading.Lock()
        self.model_actor: dict[str, str] = {}  # model_id -> base model
        self.lost: dict[str, str] = {}  # model_id -> why it is gone
        for handle in handles:
            actor = _Actor(handle)
            self._claim(actor)
            described = ray.get(handle.describe.remote())
            actor.base_models = described["base_models"]
            for info in actor.base_models:
                self._actors[info.name] = actor
                for model_id in described["models"]:
                    self.model_actor[model_id] = info.name
            if described["models"]:
                log.info("attached to %s holding %d runs (epoch %d)", [i.name for i in actor.base_models],
                         len(described["models"]), actor.epoch)

    def _claim(self, actor: _Actor) -> None:
        """Take the actor's next epoch, waiting out a restart in progress (ActorUnavailableError)."""
        deadline = time.monotonic() + CLAIM_TIMEOUT_SECONDS
        while True:
            try:
                actor.epoch = ray.get(actor.handle.claim.remote())
                return
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)

    def handle(self, base_model: str):
        return self._actors[base_model].handle

    # calling the actor

    def _invoke(self, base_model: str, method: str, *args: Any, model_id: str | None = None) -> Any:
        if model_id is not None and model_id in self.lost:
            raise EngineLost(self.lost[model_id], model_id)
        actor = self._actors.get(base_model)
        if actor is None:
            raise BadRequest(f"base_model {base_model!r} is not served here; served: {sorted(self._actors)}")
        return self._resolve(base_model, actor.handle.call.remote(actor.epoch, current_op(), method, *args), model_id)

    def _lose(self, base_model: str, why: str) -> None:
        """Mark every run of the actor lost (never silently continued on a fresh actor), then re-claim it."""
        with self._lock:
            for model_id, base in list(self.model_actor.items()):
                if base == base_model:
                    self.lost[model_id] = (f"training run {model_id!r} was lost: {why}; its state since the last "
                                           "save_state is gone. Resume it from a checkpoint "
                                           "(create_training_client_from_state_with_optimizer)")
                    del self.model_actor[model_id]
        log.error("engine actor of %s lost: %s", base_model, why)
        try:
            self._claim(self._actors[base_model])  # waits for Ray's restart of the actor
        except RayActorError:
            log.error("engine actor of %s is not coming back", base_model)

    def _base_of(self, model_id: str) -> str:
        if model_id in self.lost:
            raise EngineLost(self.lost[model_id], model_id)
        base = self.model_actor.get(model_id)
        if base is None:
            if len(self._actors) == 1:
                return next(iter(self._actors))
            raise BadRequest(f"model_id {model_id!r} is not loaded in this engine (it was unloaded or never "
                             "created); resume it from a checkpoint with create_training_client_from_state")
        return base

    # the Trainer protocol

    def base_models(self) -> list[BaseModelInfo]:
        return [info for name, actor in self._actors.items() for info in actor.base_models if info.name == name]

    def create_adapter(self, model_id: str, base_model: str, spec: AdapterSpec) -> None:
        self._invoke(base_model, "create_adapter", model_id, base_model, spec)
        self.model_actor[model_id] = base_model
        self.lost.pop(model_id, None)

    def drop_adapter(self, model_id: str) -> None:
        base = self.model_actor.pop(model_id, None)
        self.lost.pop(model_id, None)
        if base is not None:
            self._invoke(base, "drop_adapter", model_id)

    def forward_backward(self, call: ForwardBackwardCall) -> ForwardBackwardResult:
        return forward_backward_one(self, call)

    def forward_backward_many(self, calls: list[ForwardBackwardCall]) -> list[ForwardBackwardResult | Exception]:
        """Calls grouped by actor; the actors run their groups in parallel."""
        results: list = [None] * len(calls)
        groups: dict[str, list[int]] = {}
        for i, call in enumerate(calls):
            try:
                groups.setdefault(self._base_of(call.model_id), []).append(i)
            except (BadRequest, EngineLost) as exc:
                results[i] = exc
        pending = {base: self._actors[base].handle.call.remote(self._actors[base].epoch, None, "forward_backward_many",
                                                               [calls[i] for i in indices])
                   for base, indices in groups.items()}
        for base, ref in pending.items():
            try:
                outcomes = self._resolve(base, ref)
            except EngineLost as exc:
                outcomes = [EngineLost(self.lost.get(calls[i].model_id, str(exc)), calls[i].model_id)
                            for i in groups[base]]
            for i, outcome in zip(groups[base], outcomes):
                results[i] = outcome
        return results

    def _resolve(self, base: str, ref, model_id: str | None = None) -> Any:
        """The call's result, or the engine's own exception; a dead or restarted actor: `EngineLost`."""
        try:
            return ray.get(ref)
        except RayTaskError as exc:
            if not isinstance(exc.cause, Restarted):
                raise exc.cause from None
            why = f"its engine actor restarted: {exc.cause}"
        except RayActorError as exc:
            why = f"its engine actor died ({type(exc).__name__})"
        self._lose(base, why)
        raise EngineLost(self.lost.get(model_id) or
                         f"the engine actor of {base!r} died or restarted; its training runs were lost", model_id) from None

    def optim_step(self, model_id: str, params: AdamParams) -> dict[str, float]:
        return self._invoke(self._base_of(model_id), "optim_step", model_id, params, model_id=model_id)

    def snapshot_for_sampler(self, model_id: str) -> AdapterRef:
        return self._invoke(self._base_of(model_id), "snapshot_for_sampler", model_id, model_id=model_id)

    def publish_inflight(self, model_id: str) -> AdapterRef:
        """The actor's in-memory target: its sampler shares the runtime, so rows adopt it at their next step."""
        return self._invoke(self._base_of(model_id), "publish_inflight", model_id, model_id=model_id)

    def save_sampler_weights(self, model_id: str, directory: Path) -> None:
        return self._invoke(self._base_of(model_id), "save_sampler_weights", model_id, directory, model_id=model_id)

    def save_state(self, model_id: str, directory: Path, with_gradients: bool = False) -> None:
        return self._invoke(self._base_of(model_id), "save_state", model_id, directory, with_gradients,
                            model_id=model_id)

    def load_state(self, model_id: str, base_model: str | None, directory: Path, with_optimizer: bool) -> AdapterSpec:
        base = base_model or self.model_actor.get(model_id) or _checkpoint_base_model(directory) or \
            (next(iter(self._actors)) if len(self._actors) == 1 else "")
        spec = self._invoke(base, "load_state", model_id, base_model, directory, with_optimizer)
        self.model_actor[model_id] = base
        self.lost.pop(model_id, None)
        return spec


def _checkpoint_base_model(directory: Path) -> str | None:
    try:
        return json.loads((Path(directory) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


class RaySampler:
    """The `Sampler` protocol over the same actors: requests go to their base model's actor."""

    def __init__(self, trainer: RayTrainer) -> None:
        self.trainer = trainer
        self._lock = threading.Lock()
        self._submits: dict[str, list[SampleTask]] = {}
        self._cancels: dict[str, list[str]] = {}
        self._pending: dict[str, str] = {}  # request id -> base model
        self._busy: set[str] = set()  # actors that reported rows still running
        self._failed: list[tuple[str, Exception]] = []  # answered at the next step

    def submit(self, request: SampleTask) -> None:
        base = request.adapter.base_model
        with self._lock:
            if base not in self.trainer._actors:
                self._failed.append((request.request_id, BadRequest(
                    f"base_model {base!r} is not served here; served: {sorted(self.trainer._actors)}")))
                return
            self._submits.setdefault(base, []).append(request)
            self._pending[request.request_id] = base

    def cancel(self, request_id: str) -> None:
        with self._lock:
            base = self._pending.pop(request_id, None)
            if base is not None:
                self._cancels.setdefault(base, []).append(request_id)

    def has_work(self) -> bool:
        return bool(self._pending or self._cancels or self._busy or self._failed)

    def step(self) -> list[tuple[str, SampleResult | Exception]]:
        with self._lock:
            submits, self._submits = self._submits, {}
            cancels, self._cancels = self._cancels, {}
            finished, self._failed = self._failed, []
            bases = set(submits) | set(cancels) | self._busy
        refs = {base: self.trainer.handle(base).sample_step.remote(submits.get(base, []), cancels.get(base, []))
                for base in bases}
        for base, ref in refs.items():
            try:
                done, busy = ray.get(ref)
            except (RayActorError, RayTaskError) as exc:
                error = EngineLost(f"the engine actor of {base!r} failed while sampling ({type(exc).__name__}); "
                                   "resubmit the request")
                if isinstance(exc, RayActorError):  # its runs are gone too: say so before anyone trains on them
                    self.trainer._lose(base, f"its engine actor died while sampling ({type(exc).__name__})")
                with self._lock:
                    lost = [r for r, b in self._pending.items() if b == base]
                    for request_id in lost:
                        del self._pending[request_id]
                    self._busy.discard(base)
                finished.extend((request_id, error) for request_id in lost)
                continue
            with self._lock:
                (self._busy.add if busy else self._busy.discard)(base)
                for request_id, _ in done:
                    self._pending.pop(request_id, None)
            finished.extend(done)
        return finished
