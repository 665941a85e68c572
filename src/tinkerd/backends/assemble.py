"""Flags -> an engine: the one place that decides which `Trainer` and `Sampler` a server drives.

- embedded (default): the base models loaded in this process, a `FencedTrainer(LocalTrainer)` and
  a `LocalSampler` over the same runtimes (`local_engine`, which a Ray actor builds in its own
  process too);
- `trainer_ranks > 1`: training in an FSDP2 group of rank processes, sampling here on version
  folders the group writes;
- `engine="ray"`: one detached Ray actor per base model; this process never imports torch;
- `sampler="vllm"`: sampling on a vLLM server, training as above, each sampler snapshot written as
  an adapter version folder that vLLM loads (`vllm_engine`). A quick `GET /v1/models` at start only
  warns: vLLM may come up after tinkerd, and sampling requests answer a clear `server` error until
  it does.

Knows the backends and how they fit; not HTTP, the Store or the control plane (which receives the
pair through `engine.interface`). Where the version folders live is handed in (`versions_root`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import httpx

from tinkerd.backends.versions import DEFAULT_KEEP_VERSIONS, AdapterVersions, VersionedTrainer
from tinkerd.backends.vllm_sampler import VllmSampler
from tinkerd.engine.interface import Sampler, Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """What `tinkerd serve` was asked for (its flags of the same names)."""

    base_models: tuple[str | None, ...] = (None,)  # None: the embedded model
    model_cache: Path = Path("models")
    versions_root: Path = Path("adapters")  # where adapter versions are written for an out-of-process sampler
    engine: str = "embedded"  # or "ray"
    sampler: str = "local"  # or "vllm"
    dtype: str = "auto"
    device: str = "cpu"
    threads: int | None = None
    eager_norms: bool = False
    packed_gemms: str = "auto"
    trainer_ranks: int = 1
    ray_address: str | None = None
    vllm_url: str | None = None
    vllm_model: str | None = None
    vllm_keep_versions: int = DEFAULT_KEEP_VERSIONS


@dataclass
class Engine:
    trainer: Trainer
    sampler: Sampler
    names: list[str]  # the served base models
    where: str  # one line for the log: threads, actors, groups, vLLM


def check_options(options: EngineOptions) -> None:
    """Refuse combinations that cannot work (ValueError), before anything heavy loads."""
    if options.sampler == "vllm" and (not options.vllm_url or len(options.base_models) != 1
                                      or options.vllm_keep_versions < 1):
        raise ValueError("--sampler vllm needs --vllm-url, one base model and --vllm-keep-versions >= 1")
    if options.trainer_ranks < 1 or (options.trainer_ranks > 1 and (options.engine != "embedded"
                                                                    or options.device != "cpu")):
        raise ValueError("--trainer-ranks must be >= 1; groups of more run with --engine embedded on --device cpu "
                         "(gloo; NCCL groups are not implemented)")
    if options.threads is not None and options.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {options.threads}")


def assemble(options: EngineOptions) -> Engine:
    check_options(options)
    if options.engine == "ray":
        return _ray_engine(options)
    return _embedded_engine(options)


def local_engine(runtimes: dict):
    """The embedded engine over loaded runtimes: a fenced `LocalTrainer` and a `LocalSampler` sharing them."""
    from tinkerd.backends.fencing import FencedTrainer
    from tinkerd.engine.sampler import LocalSampler
    from tinkerd.engine.trainer import LocalTrainer

    return FencedTrainer(LocalTrainer(runtimes)), LocalSampler(runtimes)


def _embedded_engine(options: EngineOptions) -> Engine:
    from tinkerd.engine.threads import configure_threads

    where = configure_threads(options.threads)  # before anything else imports torch
    from tinkerd.backends.fencing import FencedTrainer
    from tinkerd.engine.runtime import load_runtimes
    from tinkerd.engine.sampler import LocalSampler
    from tinkerd.engine.trainer import LocalTrainer

    runtimes = load_runtimes(list(options.base_models), options.model_cache, options.dtype, options.device,
                             not options.eager_norms, options.packed_gemms)
    trainer: Trainer = LocalTrainer(runtimes)
    if options.trainer_ranks > 1:  # the group loads its own shards; `runtimes` stay for sampling and names
        from tinkerd.backends.fsdp_group import fsdp_trainer

        trainer = fsdp_trainer(options.trainer_ranks, list(options.base_models), options.model_cache, options.dtype,
                               not options.eager_norms, options.threads or 1)
        where += f"; FSDP2 trainer group of {options.trainer_ranks} ranks"
        if options.sampler != "vllm":  # the local sampler reads the version folders the group writes
            trainer = VersionedTrainer(trainer, AdapterVersions(options.versions_root))
    if options.sampler == "vllm":
        trainer, sampler = vllm_engine(trainer, next(iter(runtimes)), options.versions_root, options.vllm_url,
                                       options.vllm_model, options.vllm_keep_versions)
        where += f"; sampling through vLLM at {options.vllm_url}"
    else:
        sampler = LocalSampler(runtimes)
    return Engine(FencedTrainer(trainer), sampler, list(runtimes), where)


def _ray_engine(options: EngineOptions) -> Engine:
    """The engine in Ray actors; the actor writes the version folders for vLLM (DATA_DIR must be shared storage)."""
    from tinkerd.backends.ray_engine import connect

    trainer, sampler, where = connect(options.ray_address, list(options.base_models), str(options.model_cache),
                                      options.dtype, options.device, options.threads, options.packed_gemms)
    names = [m.name for m in trainer.base_models()]
    if options.sampler == "vllm":
        trainer, sampler = vllm_engine(trainer, names[0], options.versions_root, options.vllm_url,
                                       options.vllm_model, options.vllm_keep_versions)
        where += f"; sampling through vLLM at {options.vllm_url}"
    return Engine(trainer, sampler, names, where)


def vllm_engine(trainer: Trainer, base_model: str, versions_root: Path, url: str, vllm_model: str | None = None,
                keep_versions: int = DEFAULT_KEEP_VERSIONS) -> tuple[VersionedTrainer, VllmSampler]:
    """`trainer` wrapped to write a version folder per sampler snapshot, and a sampler loading those folders
    into the vLLM server at `url`. `base_model`: the one base model tinkerd trains; `vllm_model`: vLLM's
    name for it (default the same)."""
    served = vllm_model or base_model
    versions = AdapterVersions(Path(versions_root), keep=keep_versions)
    _check(url, served)
    return VersionedTrainer(trainer, versions), VllmSampler(url, {base_model: served}, versions)


def _check(url: str, served: str) -> None:
    try:
        response = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=5.0)
        response.raise_for_status()
        names = [card.get("id") for card in response.json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        log.warning("vLLM at %s is not answering yet (%s); sampling fails with a server error until it does", url, exc)
        return
    if served not in names:
        log.warning("vLLM at %s serves %s, not %r: pass --vllm-model with vLLM's --served-model-name", url, names,
                    served)
    else:
        log.info("sampling through vLLM at %s (base model %r)", url, served)
