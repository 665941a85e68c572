"""The control plane's one object (`ControlPlane`): configuration, Store, futures, scheduler, the engine
handles and the bookkeeping of loaded runs; and `ServerConfig`, what `tinkerd serve` configured.

Also the ownership rule: a caller sees only rows its API key created; anything else is "not found"
(404), so ids of other users do not leak. Knows no HTTP and no torch: routes, jobs and recovery all
take this object.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from tinkerd.engine.interface import BaseModelInfo, Sampler, Trainer
from tinkerd.control.admission import Admission
from tinkerd.control.chat_tokenizer import Tokenizers
from tinkerd.control.datadir import DataDir
from tinkerd.control.futures import FutureBoard
from tinkerd.control.scheduler import Scheduler
from tinkerd.control.sequence_records import SequenceRecords
from tinkerd.store.db import Store


class NotFound(LookupError):
    """An id that does not exist for this caller (reported as 404 with a JSON body)."""


class Gone(LookupError):
    """A training run (or its in-memory sampler weights) that was unloaded because its session ended (410)."""


@dataclass
class ServerConfig:
    data_dir: Path
    api_keys: frozenset[str] = frozenset()
    key_names: dict[str, str] = field(default_factory=dict)  # API key -> its name in the keys file
    admin_keys: frozenset[str] = frozenset()  # `--admin-key`: may read every key's audit events
    token_auth: bool = True  # SDK clients exchange their key for a short-lived JWT (`server.identity`)
    long_poll_seconds: float = 25.0
    max_pending_samples: int = 1024
    max_queued_sample_tokens_per_key: int = 0  # a key's sample tokens in the sampler before its next requests wait; 0: off
    max_runs_per_key: int = 0  # a key's loaded training runs before its next create waits; 0: off
    max_sampler_rows: int = 256  # rows decoding at once (all keys) before sample requests wait; 0: no limit
    max_body_bytes: int = 256 * 1024 * 1024
    max_decompressed_bytes: int = 64 * 1024 * 1024  # a zstd body may expand to this much, checked while decompressing
    max_topk_logprobs: int = 128  # topk_prompt_logprobs / topk_sample_logprobs: the work is positions x k
    store: str | None = None  # `--store` URL; None: SQLite at DATA_DIR/tinkerd.sqlite3
    session_timeout_seconds: float = 600.0  # no heartbeat nor training request this long: unload the session's runs
    batch_gather_seconds: float = 0.05  # how long a forward batch waits for the tenants of the previous one
    parked_state_ttl_seconds: float = 86400.0
    shutdown_park_seconds: float = 0.0  # how long a stopping server waits for its runs' state to reach the disk; 0: park none (`serve`: 300)
    jobs_url: str | None = None  # where job runners reach this server; None: jobs are accepted but stay queued
    jobs_per_key: int = 1  # running jobs per API key (the rest queue); 0: no limit
    job_max_file_bytes: int = 32 << 20  # a job's data, inline or uploaded (POST /api/v1/files)
    file_quota_bytes: int = 1 << 30  # the bytes of all of a key's uploaded files; 0: no limit
    restore_point_every_steps: int = 0  # a restore point of each run every N optim_steps, so a crash loses nothing (`journal`); 0: no journal

    @property
    def paths(self) -> DataDir:
        return DataDir(self.data_dir)


@dataclass
class Runs:
    """Training runs of this process that hold engine memory, or did (see `tinkerd.control.lifecycle`)."""

    session_of: dict[str, str] = field(default_factory=dict)  # loaded or parked run -> its session
    last_request: dict[str, float] = field(default_factory=dict)  # run -> time of its newest training request
    parked: dict[str, float] = field(default_factory=dict)  # run unloaded after its session lapsed -> when
    released: dict[str, str] = field(default_factory=dict)  # run unloaded for good -> why (finished, lapsed, expired)
    steps_since_restore_point: dict[str, int] = field(default_factory=dict)  # run -> optim_steps since its last restore point
    unjournaled: set[str] = field(default_factory=set)  # runs that got a request without seq_id: not recoverable
    recovering: dict[str, list] = field(default_factory=dict)  # run being replayed -> sample submissions waiting for it
    rebuilds: dict[str, int] = field(default_factory=dict)  # run -> times the engine lost it and it was rebuilt


@dataclass
class ControlPlane:
    config: ServerConfig
    store: Store
    trainer: Trainer
    sampler: Sampler
    board: FutureBoard
    scheduler: Scheduler
    base_models: dict[str, BaseModelInfo] = field(default_factory=dict)
    sequences: SequenceRecords = field(default_factory=SequenceRecords)
    runs: Runs = field(default_factory=Runs)
    tokenizers: Tokenizers = field(default_factory=Tokenizers)  # base models' tokenizers, for the OpenAI routes
    started_at: float = field(default_factory=time.time)
    admission: Admission | None = None  # per-key admission of sample requests; made from the config

    def __post_init__(self) -> None:
        if self.admission is None:
            self.admission = Admission(self.board, self.config.max_queued_sample_tokens_per_key,
                                       max_runs_per_key=self.config.max_runs_per_key,
                                       max_rows=self.config.max_sampler_rows)

    def owned(self, row: dict | None, owner: str, what: str, ident: str) -> dict:
        if row is None or row["owner"] != owner:
            raise NotFound(f"{what} {ident!r} not found")
        return row

    def session(self, session_id: str, owner: str) -> dict:
        return self.owned(self.store.session(session_id), owner, "session", session_id)

    def model(self, model_id: str, owner: str) -> dict:
        return self.owned(self.store.model(model_id), owner, "model_id", model_id)

    def base_model(self, name: str) -> BaseModelInfo:
        info = self.base_models.get(name)
        if info is None:
            raise NotFound(f"base_model {name!r} is not served here; served: {sorted(self.base_models)}")
        return info

    @property
    def paths(self) -> DataDir:
        return self.config.paths
