"""The `Store`: sessions, training models, sampling sessions, futures, checkpoints, custom losses, jobs and
their uploaded files, online models, and the audit log.

SQLite by default (one file in WAL mode under the data dir), or PostgreSQL with the same schema
(`open_store`, `tinkerd serve --store URL`); `dialects` holds the little that differs. Every write
commits at once, so what a client was told survives a crash. Rows are plain dicts; JSON columns are
decoded on read. Knows nothing about tensors or HTTP, and nothing about what a future's payload
means. Checkpoints carry `public` and `expires_at`: the Store records them and lists expired rows,
but does not enforce either and never touches checkpoint files (the REST layer,
`tinkerd.server.routes.rest`, does).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tinkerd.store.dialects import PostgreSQL, SQLite, StoreError, parse_store_url

DEFAULT_FILE = "tinkerd.sqlite3"  # the default store, in the data dir

__all__ = ["DEFAULT_FILE", "Store", "StoreError", "open_store"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL NOT NULL, last_seen REAL NOT NULL,
    finished INTEGER NOT NULL DEFAULT 0, sdk_version TEXT, tags TEXT, user_metadata TEXT
);
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY, session_id TEXT NOT NULL, owner TEXT NOT NULL, base_model TEXT NOT NULL,
    lora_config TEXT NOT NULL, user_metadata TEXT, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sampling_sessions (
    id TEXT PRIMARY KEY, session_id TEXT NOT NULL, owner TEXT NOT NULL, base_model TEXT NOT NULL,
    model_path TEXT, adapter_uri TEXT, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS futures (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, kind TEXT NOT NULL, model_id TEXT, seq_id INTEGER,
    state TEXT NOT NULL, result_json TEXT, result_pb BLOB, error TEXT, category TEXT,
    created REAL NOT NULL, finished REAL, request BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS futures_model_seq ON futures(model_id, seq_id)
    WHERE model_id IS NOT NULL AND seq_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS checkpoints (
    path TEXT PRIMARY KEY, model_id TEXT NOT NULL, owner TEXT NOT NULL, kind TEXT NOT NULL,
    name TEXT NOT NULL, directory TEXT NOT NULL, base_model TEXT NOT NULL, created REAL NOT NULL,
    public INTEGER NOT NULL DEFAULT 0, expires_at REAL, user_metadata TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL, created REAL NOT NULL,
    started REAL, finished REAL, job_spec TEXT NOT NULL, job_progress TEXT, job_result TEXT, job_resume TEXT,
    token_hash TEXT, model_id TEXT, error TEXT
);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL, size INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_events (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, event TEXT NOT NULL, model_id TEXT, tinker_path TEXT,
    details TEXT, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS custom_losses (
    id TEXT PRIMARY KEY, session_id TEXT NOT NULL, owner TEXT NOT NULL, name TEXT NOT NULL,
    definition TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS online_models (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, name TEXT NOT NULL, base_model TEXT NOT NULL, source TEXT,
    settings TEXT NOT NULL, status TEXT NOT NULL, session_id TEXT, model_id TEXT, sampling_session_id TEXT,
    anchors TEXT, updates INTEGER NOT NULL DEFAULT 0, last_update REAL, history TEXT, error TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS online_feedback (
    id TEXT PRIMARY KEY, online_id TEXT NOT NULL, kind TEXT NOT NULL, feedback TEXT NOT NULL, created REAL NOT NULL,
    learned_update INTEGER, learned REAL
);
CREATE TABLE IF NOT EXISTS steps (
    owner TEXT NOT NULL, session_id TEXT, model_id TEXT, seq_id INTEGER, kind TEXT NOT NULL,
    created REAL NOT NULL, metrics TEXT NOT NULL
);
"""

# Columns added after the first release: databases created before them get them by ALTER TABLE.
_ADDED_COLUMNS = {
    "checkpoints": {"public": "INTEGER NOT NULL DEFAULT 0", "expires_at": "REAL", "user_metadata": "TEXT"},
    "futures": {"request": "BLOB"},
    "sampling_sessions": {"inflight_of": "TEXT"},  # the training run whose inflight target it samples
}

# Indexes for the listing queries (created after the columns they use exist).
INDEXES = """
CREATE INDEX IF NOT EXISTS futures_model ON futures(model_id, created) WHERE model_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS futures_journal ON futures(model_id) WHERE request IS NOT NULL;
CREATE INDEX IF NOT EXISTS models_owner ON models(owner, created);
CREATE INDEX IF NOT EXISTS models_session ON models(session_id);
CREATE INDEX IF NOT EXISTS sessions_owner ON sessions(owner, created);
CREATE INDEX IF NOT EXISTS sampling_sessions_session ON sampling_sessions(session_id);
CREATE INDEX IF NOT EXISTS checkpoints_model ON checkpoints(model_id, created);
CREATE INDEX IF NOT EXISTS checkpoints_owner ON checkpoints(owner, created);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, created);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created);
CREATE INDEX IF NOT EXISTS files_owner ON files(owner, created);
CREATE INDEX IF NOT EXISTS audit_events_time ON audit_events(created);
CREATE INDEX IF NOT EXISTS checkpoints_expiry ON checkpoints(expires_at) WHERE expires_at IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS steps_model_seq ON steps(model_id, seq_id)
    WHERE model_id IS NOT NULL AND seq_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS steps_model ON steps(model_id) WHERE model_id IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS online_models_name ON online_models(owner, name);
CREATE INDEX IF NOT EXISTS online_feedback_model ON online_feedback(online_id, created);
CREATE INDEX IF NOT EXISTS steps_session ON steps(session_id, created) WHERE session_id IS NOT NULL;
"""

_JSON_COLUMNS = {"tags", "user_metadata", "lora_config", "result_json", "metrics", "definition", "details",
                 "job_spec", "job_progress", "job_result", "job_resume", "settings", "anchors", "history", "feedback"}


def open_store(url: str | None, data_dir: Path) -> "Store":
    """The Store a `--store` URL names; None: the SQLite file `DATA_DIR/tinkerd.sqlite3`.
    Raises `StoreError` for a bad URL or a database that cannot be reached."""
    if not url:
        return Store(SQLite(data_dir / DEFAULT_FILE))
    kind, where = parse_store_url(url)
    return Store(SQLite(where) if kind == "sqlite" else PostgreSQL(where))


class Store:
    def __init__(self, db: SQLite | PostgreSQL) -> None:
        self._db = db
        self.description = f"{db.name} {db.description}"
        self._lock = threading.Lock()
        with self._lock, db.schema_lock():
            for statement in _statements(SCHEMA):
                db.execute(db.ddl(statement))
            self._add_missing_columns()
            for statement in _statements(INDEXES):
                db.execute(statement)

    def _add_missing_columns(self) -> None:
        for table, columns in _ADDED_COLUMNS.items():
            have = {row["name"] for row in self._db.execute(self._db.columns_sql, (table,)).fetchall()}
            for name, decl in columns.items():
                if name not in have:
                    self._db.execute(self._db.ddl(f"ALTER TABLE {table} ADD COLUMN {name} {decl}"))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, args: tuple = ()) -> int:
        """Runs one statement; the number of rows it changed."""
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def _insert(self, table: str, row: dict[str, Any], key: str | None = None) -> None:
        """INSERT; with `key`, an upsert: a row with the same key gets every column of `row`."""
        values = tuple(json.dumps(v) if k in _JSON_COLUMNS and v is not None else v for k, v in row.items())
        sql = f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})"
        if key is not None:
            sql += f" ON CONFLICT ({key}) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in row if c != key)
        self._execute(sql, values)

    def _one(self, sql: str, args: tuple) -> dict | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return _decode(row) if row is not None else None

    def _all(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_decode(r) for r in rows]

    def _page(self, table: str, where: str, args: tuple, limit: int, offset: int) -> tuple[list[dict], int]:
        """One page of rows, newest first, and the total number of matching rows."""
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) AS n FROM {table} WHERE {where}", args).fetchone()["n"]
            rows = self._db.execute(f"SELECT * FROM {table} WHERE {where} ORDER BY created DESC, rowid DESC "
                                    "LIMIT ? OFFSET ?", (*args, limit, offset)).fetchall()
        return [_decode(r) for r in rows], total

    # sessions
    def add_session(self, session_id: str, owner: str, sdk_version: str | None, tags: list, user_metadata: dict) -> None:
        now = time.time()
        self._insert("sessions", dict(id=session_id, owner=owner, created=now, last_seen=now,
                                      sdk_version=sdk_version, tags=tags, user_metadata=user_metadata))

    def session(self, session_id: str) -> dict | None:
        return self._one("SELECT * FROM sessions WHERE id = ?", (session_id,))

    def touch_session(self, session_id: str) -> None:
        self._execute("UPDATE sessions SET last_seen = ? WHERE id = ?", (time.time(), session_id))

    def finish_session(self, session_id: str) -> None:
        self._execute("UPDATE sessions SET finished = 1, last_seen = ? WHERE id = ?", (time.time(), session_id))

    def list_sessions(self, owner: str, limit: int, offset: int) -> tuple[list[dict], int]:
        return self._page("sessions", "owner = ?", (owner,), limit, offset)

    def session_model_ids(self, session_id: str) -> list[str]:
        rows = self._all("SELECT id FROM models WHERE session_id = ? ORDER BY created, rowid", (session_id,))
        return [r["id"] for r in rows]

    def session_sampler_ids(self, session_id: str) -> list[str]:
        rows = self._all("SELECT id FROM sampling_sessions WHERE session_id = ? ORDER BY created, rowid", (session_id,))
        return [r["id"] for r in rows]

    # training models
    def add_model(self, model_id: str, session_id: str, owner: str, base_model: str, lora_config: dict,
                  user_metadata: dict | None) -> None:
        self._insert("models", dict(id=model_id, session_id=session_id, owner=owner, base_model=base_model,
                                    lora_config=lora_config, user_metadata=user_metadata, created=time.time()))

    def model(self, model_id: str) -> dict | None:
        return self._one("SELECT * FROM models WHERE id = ?", (model_id,))

    def list_models(self, owner: str, limit: int, offset: int, with_public: bool = False) -> tuple[list[dict], int]:
        """The owner's models; with `with_public`, also other owners' models that have a published checkpoint
        (expiry is not checked here)."""
        if with_public:
            return self._page("models", "owner = ? OR id IN (SELECT model_id FROM checkpoints WHERE public = 1)",
                              (owner,), limit, offset)
        return self._page("models", "owner = ?", (owner,), limit, offset)

    def model_last_request(self, model_id: str) -> float | None:
        """When the newest request (future) for this model was made, or None if there was none."""
        row = self._one("SELECT MAX(created) AS latest FROM futures WHERE model_id = ?", (model_id,))
        return row["latest"] if row else None

    # sampling sessions
    def add_sampling_session(self, sampler_id: str, session_id: str, owner: str, base_model: str,
                             model_path: str | None, adapter_uri: str | None, inflight_of: str | None = None) -> None:
        self._insert("sampling_sessions", dict(id=sampler_id, session_id=session_id, owner=owner, base_model=base_model,
                                               model_path=model_path, adapter_uri=adapter_uri, created=time.time(),
                                               inflight_of=inflight_of),
                     key="id")

    def has_inflight_sessions(self, model_id: str) -> bool:
        return self._one("SELECT 1 AS one FROM sampling_sessions WHERE inflight_of = ? LIMIT 1", (model_id,)) is not None

    def repoint_inflight_sessions(self, model_id: str, adapter_uri: str) -> int:
        """Every inflight sampling session of run `model_id` now samples `adapter_uri`; how many there are."""
        return self._execute("UPDATE sampling_sessions SET adapter_uri = ? WHERE inflight_of = ?", (adapter_uri, model_id))

    def sampling_session(self, sampler_id: str) -> dict | None:
        return self._one("SELECT * FROM sampling_sessions WHERE id = ?", (sampler_id,))

    # futures
    def add_future(self, future_id: str, owner: str, kind: str, model_id: str | None = None,
                   seq_id: int | None = None, request: bytes | None = None) -> None:
        """`request`: what it takes to run the operation again (the journal; see `tinkerd.control.journal`)."""
        self._insert("futures", dict(id=future_id, owner=owner, kind=kind, model_id=model_id, seq_id=seq_id,
                                     state="pending", created=time.time(), request=request))

    def future(self, future_id: str) -> dict | None:
        return self._one("SELECT * FROM futures WHERE id = ?", (future_id,))

    def future_for_seq(self, model_id: str, seq_id: int) -> dict | None:
        return self._one("SELECT * FROM futures WHERE model_id = ? AND seq_id = ?", (model_id, seq_id))

    def complete_future(self, future_id: str, result_json: dict | None = None, result_pb: bytes | None = None) -> None:
        self._execute(
            "UPDATE futures SET state = 'done', result_json = ?, result_pb = ?, finished = ? WHERE id = ?",
            (json.dumps(result_json) if result_json is not None else None, result_pb, time.time(), future_id),
        )

    def fail_future(self, future_id: str, error: str, category: str, state: str = "error") -> None:
        """`state` 'lost': the request never ran to an end and the client may send it again (`routes.futures`)."""
        self._execute("UPDATE futures SET state = ?, error = ?, category = ?, finished = ? WHERE id = ?",
                      (state, error, category, time.time(), future_id))

    def fail_unfinished_futures(self, error: str, kind: str | None = None, state: str = "error",
                                keep: set[str] = frozenset()) -> int:
        """At start-up: requests (of one kind, or all; but those in `keep`) that were in flight when the server
        stopped get a clear error (`state` 'lost': the client may send them again, see `routes.futures`)."""
        which = "" if kind is None else " AND kind = ?"
        kept = f" AND id NOT IN ({', '.join('?' * len(keep))})" if keep else ""
        return self._execute(
            f"UPDATE futures SET state = ?, error = ?, category = 'server', finished = ? WHERE state = 'pending'"
            f"{which}{kept}", (state, error, time.time(), *(() if kind is None else (kind,)), *keep),
        )

    # the journal: ordered training requests, kept until a restore point of their run covers them
    def journal(self, model_id: str, after_seq: int) -> list[dict]:
        """A run's ordered requests with seq_id > `after_seq`, oldest first (id, kind, seq_id, state, request)."""
        return self._all("SELECT id, owner, kind, seq_id, state, request FROM futures WHERE model_id = ? AND seq_id > ? "
                         "ORDER BY seq_id", (model_id, after_seq))

    def journaled_models(self) -> list[str]:
        """Runs that still hold journal entries (requests not yet covered by a restore point)."""
        rows = self._all("SELECT DISTINCT model_id FROM futures WHERE model_id IS NOT NULL AND request IS NOT NULL")
        return [r["model_id"] for r in rows]

    def forget_journal(self, model_id: str, through_seq: int) -> int:
        """A restore point covers a run's requests up to `through_seq`: drop their payloads (the results stay)."""
        return self._execute("UPDATE futures SET request = NULL WHERE model_id = ? AND seq_id <= ? AND request IS NOT NULL",
                             (model_id, through_seq))

    # checkpoints
    def add_checkpoint(self, path: str, model_id: str, owner: str, kind: str, name: str, directory: str,
                       base_model: str, user_metadata: dict | None = None) -> None:
        """Adds (or, on overwrite, replaces) a checkpoint row; a replaced row is private again and has no TTL."""
        self._insert("checkpoints", dict(path=path, model_id=model_id, owner=owner, kind=kind, name=name,
                                         directory=directory, base_model=base_model, created=time.time(),
                                         public=0, expires_at=None, user_metadata=user_metadata),
                     key="path")

    def checkpoint(self, path: str) -> dict | None:
        """The row, expired or not (`expires_at` is a Unix time or None); callers decide what expiry means."""
        return self._one("SELECT * FROM checkpoints WHERE path = ?", (path,))

    def model_checkpoints(self, model_id: str) -> list[dict]:
        return self._all("SELECT * FROM checkpoints WHERE model_id = ? ORDER BY created DESC, rowid DESC", (model_id,))

    def list_checkpoints(self, owner: str, limit: int, offset: int) -> tuple[list[dict], int]:
        return self._page("checkpoints", "owner = ?", (owner,), limit, offset)

    def readable_sampler_checkpoints(self, owner: str) -> list[dict]:
        """Sampler checkpoints `owner` created or anyone published, newest first (expired ones too)."""
        return self._all("SELECT * FROM checkpoints WHERE kind = 'sampler_weights' AND (owner = ? OR public = 1) "
                         "ORDER BY created DESC, rowid DESC", (owner,))

    def set_checkpoint_public(self, path: str, public: bool) -> None:
        self._execute("UPDATE checkpoints SET public = ? WHERE path = ?", (int(public), path))

    def set_checkpoint_ttl(self, path: str, ttl_seconds: float | None) -> None:
        """Expire the checkpoint `ttl_seconds` from now (a negative value means already expired); None: never."""
        expires_at = None if ttl_seconds is None else time.time() + ttl_seconds
        self._execute("UPDATE checkpoints SET expires_at = ? WHERE path = ?", (expires_at, path))

    def expired_checkpoints(self, now: float | None = None) -> list[dict]:
        now = time.time() if now is None else now
        return self._all("SELECT * FROM checkpoints WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))

    def delete_checkpoint(self, path: str) -> None:
        self._execute("DELETE FROM checkpoints WHERE path = ?", (path,))

    # task-level jobs (`tinkerd.control.jobs`): a row per job; the job's runner reports into it
    def add_job(self, job_id: str, owner: str, kind: str, job_spec: dict) -> None:
        self._insert("jobs", dict(id=job_id, owner=owner, kind=kind, status="queued", created=time.time(),
                                  job_spec=job_spec))

    def job(self, job_id: str) -> dict | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def list_jobs(self, owner: str, limit: int, offset: int) -> tuple[list[dict], int]:
        return self._page("jobs", "owner = ?", (owner,), limit, offset)

    def jobs_in(self, statuses: tuple[str, ...]) -> list[dict]:
        """Every owner's jobs in these states, oldest first (the job queue)."""
        marks = ", ".join("?" * len(statuses))
        return self._all(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY created, rowid", statuses)

    def job_for_token(self, token_hash: str) -> dict | None:
        return self._one("SELECT * FROM jobs WHERE token_hash = ?", (token_hash,))

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Sets the given columns (JSON columns take dicts)."""
        values = tuple(json.dumps(v) if k in _JSON_COLUMNS and v is not None else v for k, v in fields.items())
        self._execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?", (*values, job_id))

    # uploaded files (`tinkerd.control.jobs.uploads`): a row per file; its bytes are a file in the data dir
    def add_file(self, file_id: str, owner: str, filename: str, purpose: str, size: int) -> None:
        self._insert("files", dict(id=file_id, owner=owner, filename=filename, purpose=purpose, size=size,
                                   created=time.time()))

    def file(self, file_id: str) -> dict | None:
        return self._one("SELECT * FROM files WHERE id = ?", (file_id,))

    def list_files(self, owner: str) -> list[dict]:
        """All the owner's files, newest first (the caller pages: a key's files are few, bounded by its quota)."""
        return self._all("SELECT * FROM files WHERE owner = ? ORDER BY created DESC, rowid DESC", (owner,))

    def file_bytes(self, owner: str) -> int:
        return int(self._one("SELECT COALESCE(SUM(size), 0) AS n FROM files WHERE owner = ?", (owner,))["n"])

    def delete_file(self, file_id: str) -> bool:
        return self._execute("DELETE FROM files WHERE id = ?", (file_id,)) > 0

    # online models (`tinkerd.control.online`): a row per model, a row per piece of feedback (learned: NULL until
    # an update has trained on it)
    def add_online_model(self, online_id: str, owner: str, name: str, base_model: str, source: str | None,
                         settings: dict) -> None:
        """Raises the database's integrity error if the owner already has a model of that name."""
        self._insert("online_models", dict(id=online_id, owner=owner, name=name, base_model=base_model, source=source,
                                           settings=settings, status="creating", created=time.time(), history=[]))

    def online_model(self, online_id: str) -> dict | None:
        return self._one("SELECT * FROM online_models WHERE id = ?", (online_id,))

    def online_model_named(self, owner: str, name: str) -> dict | None:
        return self._one("SELECT * FROM online_models WHERE owner = ? AND name = ?", (owner, name))

    def list_online_models(self, owner: str, limit: int, offset: int) -> tuple[list[dict], int]:
        return self._page("online_models", "owner = ?", (owner,), limit, offset)

    def online_models_in(self, statuses: tuple[str, ...]) -> list[dict]:
        marks = ", ".join("?" * len(statuses))
        return self._all(f"SELECT * FROM online_models WHERE status IN ({marks}) ORDER BY created, rowid", statuses)

    def update_online_model(self, online_id: str, **fields: Any) -> None:
        values = tuple(json.dumps(v) if k in _JSON_COLUMNS and v is not None else v for k, v in fields.items())
        self._execute(f"UPDATE online_models SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                      (*values, online_id))

    def delete_online_model(self, online_id: str) -> None:
        self._execute("DELETE FROM online_feedback WHERE online_id = ?", (online_id,))
        self._execute("DELETE FROM online_models WHERE id = ?", (online_id,))

    def add_feedback(self, feedback_id: str, online_id: str, kind: str, feedback: dict) -> None:
        """Committed when this returns (the route acknowledges only then)."""
        self._insert("online_feedback", dict(id=feedback_id, online_id=online_id, kind=kind, feedback=feedback,
                                             created=time.time()))

    def feedback(self, online_id: str, learned: bool | None = None, limit: int = 1 << 30) -> list[dict]:
        """An online model's feedback, oldest first: all, only learned ones, or only those not learned yet."""
        which = "" if learned is None else (" AND learned IS NOT NULL" if learned else " AND learned IS NULL")
        return self._all(f"SELECT * FROM online_feedback WHERE online_id = ?{which} ORDER BY created, rowid LIMIT ?",
                         (online_id, limit))

    def feedback_counts(self, online_id: str) -> dict[str, int]:
        row = self._one("SELECT COUNT(*) AS stored, COUNT(learned) AS learned FROM online_feedback "
                        "WHERE online_id = ?", (online_id,))
        return {"stored": row["stored"], "learned": row["learned"], "pending": row["stored"] - row["learned"]}

    def mark_feedback_learned(self, feedback_ids: list[str], update: int) -> None:
        now = time.time()
        for feedback_id in feedback_ids:
            self._execute("UPDATE online_feedback SET learned_update = ?, learned = ? WHERE id = ?",
                          (update, now, feedback_id))

    def forget_learned_feedback(self, online_id: str) -> int:
        """Every piece of the model's feedback is to be learned again (its weights were rebuilt from the base)."""
        return self._execute("UPDATE online_feedback SET learned_update = NULL, learned = NULL WHERE online_id = ?",
                             (online_id,))

    def online_totals(self) -> dict[str, int]:
        """Across every owner: online models, their updates, feedback stored and learned (`/metrics`)."""
        models = self._one("SELECT COUNT(*) AS n, COALESCE(SUM(updates), 0) AS updates FROM online_models", ())
        feedback = self._one("SELECT COUNT(*) AS stored, COUNT(learned) AS learned FROM online_feedback", ())
        return {"models": models["n"], "updates": int(models["updates"]), "feedback_stored": feedback["stored"],
                "feedback_learned": feedback["learned"]}

    def max_seq_id(self, model_id: str) -> int:
        """The highest seq_id any request of the run used (-1: none)."""
        row = self._one("SELECT MAX(seq_id) AS top FROM futures WHERE model_id = ?", (model_id,))
        return -1 if row is None or row["top"] is None else int(row["top"])

    # steps: what each training request and sample measured (the console's curves, `tinkerd.control.curves`)
    def add_step(self, owner: str, session_id: str | None, model_id: str | None, seq_id: int | None, kind: str,
                 metrics: dict[str, float]) -> None:
        """One measured request; a run's seq_id is recorded once (a replay after a crash adds nothing)."""
        values = (owner, session_id, model_id, seq_id, kind, time.time(), json.dumps(metrics))
        self._execute("INSERT INTO steps (owner, session_id, model_id, seq_id, kind, created, metrics) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", values)

    def run_steps(self, model_id: str, after: int = 0) -> list[dict]:
        """A run's steps in the order they were recorded, after the cursor `after` (a row's `cursor`)."""
        with self._lock:
            rows = self._db.execute("SELECT rowid AS cursor, seq_id, kind, created, metrics FROM steps "
                                    "WHERE model_id = ? AND rowid > ? ORDER BY rowid", (model_id, after)).fetchall()
        metrics = json.loads("[" + ",".join(r["metrics"] for r in rows) + "]")  # one parse: 10,000 rows in ms
        return [{"cursor": r["cursor"], "seq_id": r["seq_id"], "kind": r["kind"], "created": r["created"],
                 "metrics": m} for r, m in zip(rows, metrics)]

    def session_steps(self, session_id: str, since: float) -> list[dict]:
        """A session's steps (its runs' and its samplers') recorded at or after `since`, oldest first."""
        return self._all("SELECT kind, created, metrics FROM steps WHERE session_id = ? AND created >= ? "
                         "ORDER BY created", (session_id, since))

    # server-side custom losses: a session's traced loss graphs, as plain JSON (kept: journals replay them)
    def add_custom_loss(self, loss_id: str, session_id: str, owner: str, name: str, definition: dict) -> bool:
        """False if `loss_id` already exists (a retried create); the first definition stays."""
        if self.custom_loss(loss_id) is not None:
            return False
        self._insert("custom_losses", dict(id=loss_id, session_id=session_id, owner=owner, name=name,
                                           definition=definition, created=time.time()))
        return True

    def custom_loss(self, loss_id: str) -> dict | None:
        return self._one("SELECT * FROM custom_losses WHERE id = ?", (loss_id,))

    # the audit log: who created, deleted, published or read what, and when
    def add_audit_event(self, owner: str, event: str, details: dict, model_id: str | None = None,
                        tinker_path: str | None = None) -> None:
        self._insert("audit_events", dict(id=uuid.uuid4().hex, owner=owner, event=event, model_id=model_id,
                                          tinker_path=tinker_path, details=details, created=time.time()))

    def audit_events(self, start: float, end: float, owner: str | None = None) -> list[dict]:
        """Events with start <= created < end, oldest first; one owner's, or (None) everyone's."""
        mine = "" if owner is None else " AND owner = ?"
        return self._all(f"SELECT * FROM audit_events WHERE created >= ? AND created < ?{mine} ORDER BY created, rowid",
                         (start, end, *(() if owner is None else (owner,))))

    # operator views across every API key (the CLI)
    def all_models(self) -> list[dict]:
        return self._all("SELECT * FROM models ORDER BY created, rowid")

    def checkpoint_counts(self) -> dict[str, int]:
        return {r["model_id"]: r["n"] for r in self._all("SELECT model_id, COUNT(*) AS n FROM checkpoints GROUP BY model_id")}

    def all_checkpoints(self) -> list[dict]:
        return self._all("SELECT * FROM checkpoints ORDER BY created DESC, rowid DESC")


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _decode(row: Any) -> dict:
    out = dict(row)
    out.pop("rowid", None)  # PostgreSQL's explicit insertion order; SQLite's is implicit
    for key in _JSON_COLUMNS & out.keys():
        if out[key] is not None:
            out[key] = json.loads(out[key])
    return out
