"""Adapter versions: immutable PEFT folders `model_id@version` that an out-of-process sampler loads.

(Not to be confused with publishing a checkpoint, which makes it readable by every key.)
`AdapterVersions` is the registry. `add` writes a training run's current adapter to
`<root>/<model_id>/v<version>.<generation>/` (the writer writes a temporary folder, fsyncs it and
renames it into place; the registry then fsyncs the parent folder) and numbers versions 1, 2, 3...
per run. A folder is never rewritten: a new version gets a new folder and a new name, so a sampler
never sees half-written weights or a stale cache entry under a reused name. The generation, new in
each process, keeps names unique across restarts too: a run that resumes in a new process (parked,
or rebuilt after a crash) numbers its versions from 1 again, and neither a client holding an old
folder nor a vLLM server that outlived the old process (its LoRA cache is keyed by name) may take
the new weights for the old ones.

Reference counting: a sampling request holds its version from `acquire` to `release`. A sampling
client holds its version while it is one of the newest `keep` versions of its run and the run is
loaded (the embedded engine keeps the same number of in-memory snapshots per run; older ones
answer a user error). A version is retired (folder deleted, `on_retire` listeners told, e.g. to
unload it from vLLM) only when no request holds it and it fell out of that window or its run was
dropped. The newest version of a loaded run is never retired.

`VersionedTrainer` wraps any `Trainer` so that `snapshot_for_sampler` writes a version folder instead
of freezing an in-memory copy, and writes a new one only after the weights changed.

Knows nothing about HTTP, vLLM or torch; the folder's contents are the writer's business. Versions
live in this process only: folders left by a previous process are deleted at start (no sampling
session can use them any more, as with in-memory snapshots).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tinkerd.engine.interface import AdapterRef, AdapterSpec, Trainer, version_folder, version_run
from tinkerd.protocol.types import AdamParams, BadRequest

log = logging.getLogger(__name__)

DEFAULT_KEEP_VERSIONS = 8  # as many as the embedded engine's in-memory sampler snapshots per run



@dataclass(eq=False)  # identity: two versions are never the same
class Version:
    model_id: str
    label: str  # v<number>.<generation>: the folder's name
    path: Path
    requests: int = 0  # sampling requests in flight on it

    @property
    def name(self) -> str:
        return f"{self.model_id}@{self.label}"


class AdapterVersions:
    def __init__(self, root: Path, keep: int = DEFAULT_KEEP_VERSIONS) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.generation = uuid.uuid4().hex[:8]  # this process's: see the module docstring
        self.on_retire: list[Callable[[Version], None]] = []
        self._lock = threading.Lock()
        self._runs: dict[str, list[Version]] = {}  # model_id -> live versions, oldest first
        self._by_path: dict[str, Version] = {}
        self._next: dict[str, int] = {}
        self._dropped: set[str] = set()
        if self.root.exists():
            stale = [p for p in self.root.iterdir()]
            for path in stale:
                shutil.rmtree(path, ignore_errors=True)
            if stale:
                log.info("deleted %d adapter version folders left by a previous process under %s", len(stale), self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    def add(self, model_id: str, write: Callable[[Path], None]) -> Version:
        """Write the next version of `model_id` with `write(folder)` (which must create the folder
        atomically) and register it; older versions outside the window may retire."""
        if not model_id or "/" in model_id or model_id in (".", ".."):
            raise BadRequest(f"model_id {model_id!r} cannot name an adapter folder")
        with self._lock:
            number = self._next.get(model_id, 1)
            self._next[model_id] = number + 1
        label = f"v{number}.{self.generation}"
        version = Version(model_id, label, version_folder(self.root, model_id, label))
        write(version.path)
        _fsync_dir(version.path)
        _fsync_dir(version.path.parent)
        with self._lock:
            self._dropped.discard(model_id)
            self._runs.setdefault(model_id, []).append(version)
            self._by_path[str(version.path)] = version
            retired = self._take_retirable(model_id)
        self._retire(retired)
        return version

    def is_version(self, uri: str | None) -> bool:
        """Whether `uri` points into this registry's folder (live or not)."""
        return version_run(uri, self.root) is not None

    def acquire(self, uri: str) -> Version:
        """Hold a version for one sampling request (user error if it was retired)."""
        with self._lock:
            version = self._by_path.get(str(uri))
            if version is None:
                raise BadRequest(
                    f"sampler weights {uri!r} are no longer kept (only the newest {self.keep} versions per "
                    "training run are kept, and none after the run is unloaded or the server restarts); call "
                    "save_weights_and_get_sampling_client again or save named sampler weights")
            version.requests += 1
            return version

    def release(self, version: Version) -> None:
        with self._lock:
            version.requests -= 1
            retired = self._take_retirable(version.model_id)
        self._retire(retired)

    def drop_run(self, model_id: str) -> None:
        """The run was unloaded: its versions retire once no request holds them."""
        with self._lock:
            self._dropped.add(model_id)
            retired = self._take_retirable(model_id)
        self._retire(retired)

    def live(self, model_id: str) -> list[Version]:
        with self._lock:
            return list(self._runs.get(model_id, []))

    def _take_retirable(self, model_id: str) -> list[Version]:
        versions = self._runs.get(model_id, [])
        held = [] if model_id in self._dropped else versions[-self.keep:]
        retired = [v for v in versions if v.requests == 0 and v not in held]
        if retired:
            self._runs[model_id] = [v for v in versions if v not in retired]
            for version in retired:
                del self._by_path[str(version.path)]
            if not self._runs[model_id]:
                del self._runs[model_id]
        return retired

    def _retire(self, versions: list[Version]) -> None:
        for version in versions:
            shutil.rmtree(version.path, ignore_errors=True)
            for listener in self.on_retire:
                try:
                    listener(version)
                except Exception:  # noqa: BLE001 - a listener's failure must not stop the cleanup
                    log.exception("on_retire listener failed for %s", version.name)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VersionedTrainer:
    """A `Trainer` whose sampler snapshots are version folders (`AdapterRef.uri` = the folder).

    Every other call goes to the wrapped trainer. A run gets a new version only when its weights
    changed since its last one (optim_step, load_state, create) or its last version retired.
    """

    def __init__(self, trainer: Trainer, versions: AdapterVersions) -> None:
        self.trainer = trainer
        self.versions = versions
        self._current: dict[str, tuple[Version, str]] = {}  # model_id -> (newest version, its base model)

    def __getattr__(self, name: str):
        return getattr(self.trainer, name)

    def create_adapter(self, model_id: str, base_model: str, spec: AdapterSpec) -> None:
        self.trainer.create_adapter(model_id, base_model, spec)
        self._current.pop(model_id, None)

    def optim_step(self, model_id: str, params: AdamParams) -> dict[str, float]:
        self._current.pop(model_id, None)  # even a failed step may have changed nothing; a new version is safe
        return self.trainer.optim_step(model_id, params)

    def load_state(self, model_id: str, base_model: str | None, directory: Path, with_optimizer: bool) -> AdapterSpec:
        self._current.pop(model_id, None)
        return self.trainer.load_state(model_id, base_model, directory, with_optimizer)

    def drop_adapter(self, model_id: str) -> None:
        self.trainer.drop_adapter(model_id)
        self._current.pop(model_id, None)
        self.versions.drop_run(model_id)

    def publish_inflight(self, model_id: str) -> AdapterRef:
        """A version folder, as for a snapshot: an out-of-process sampler cannot swap the weights of a generation
        it is running, so requests started after this save use it and those in flight finish on theirs."""
        return self.snapshot_for_sampler(model_id)

    def snapshot_for_sampler(self, model_id: str) -> AdapterRef:
        current = self._current.get(model_id)
        if current is None or current[0] not in self.versions.live(model_id):
            version = self.versions.add(model_id, lambda folder: self.trainer.save_sampler_weights(model_id, folder))
            config = json.loads((version.path / "adapter_config.json").read_text())
            current = self._current[model_id] = (version, config["base_model_name_or_path"])
        version, base_model = current
        return AdapterRef(uri=str(version.path), base_model=base_model)
