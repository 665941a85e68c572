"""The SQLite `Store`: sessions, training models, sampling sessions, futures and checkpoints.

One file in WAL mode under the data dir. Every write commits at once, so what a client was told
survives a crash. Rows are plain dicts; JSON columns are decoded on read. Knows nothing about
tensors or HTTP, and nothing about what a future's payload means.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

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
    created REAL NOT NULL, finished REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS futures_model_seq ON futures(model_id, seq_id)
    WHERE model_id IS NOT NULL AND seq_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS checkpoints (
    path TEXT PRIMARY KEY, model_id TEXT NOT NULL, owner TEXT NOT NULL, kind TEXT NOT NULL,
    name TEXT NOT NULL, directory TEXT NOT NULL, base_model TEXT NOT NULL, created REAL NOT NULL
);
"""

_JSON_COLUMNS = {"tags", "user_metadata", "lora_config", "result_json"}


class SQLiteStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _insert(self, table: str, row: dict[str, Any], replace: bool = False) -> None:
        values = tuple(json.dumps(v) if k in _JSON_COLUMNS and v is not None else v for k, v in row.items())
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        self._execute(f"{verb} INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", values)

    def _one(self, sql: str, args: tuple) -> dict | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return _decode(row) if row is not None else None

    def _all(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_decode(r) for r in rows]

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

    # training models
    def add_model(self, model_id: str, session_id: str, owner: str, base_model: str, lora_config: dict,
                  user_metadata: dict | None) -> None:
        self._insert("models", dict(id=model_id, session_id=session_id, owner=owner, base_model=base_model,
                                    lora_config=lora_config, user_metadata=user_metadata, created=time.time()))

    def model(self, model_id: str) -> dict | None:
        return self._one("SELECT * FROM models WHERE id = ?", (model_id,))

    # sampling sessions
    def add_sampling_session(self, sampler_id: str, session_id: str, owner: str, base_model: str,
                             model_path: str | None, adapter_uri: str | None) -> None:
        self._insert("sampling_sessions", dict(id=sampler_id, session_id=session_id, owner=owner, base_model=base_model,
                                               model_path=model_path, adapter_uri=adapter_uri, created=time.time()),
                     replace=True)

    def sampling_session(self, sampler_id: str) -> dict | None:
        return self._one("SELECT * FROM sampling_sessions WHERE id = ?", (sampler_id,))

    # futures
    def add_future(self, future_id: str, owner: str, kind: str, model_id: str | None = None,
                   seq_id: int | None = None) -> None:
        self._insert("futures", dict(id=future_id, owner=owner, kind=kind, model_id=model_id, seq_id=seq_id,
                                     state="pending", created=time.time()))

    def future(self, future_id: str) -> dict | None:
        return self._one("SELECT * FROM futures WHERE id = ?", (future_id,))

    def future_for_seq(self, model_id: str, seq_id: int) -> dict | None:
        return self._one("SELECT * FROM futures WHERE model_id = ? AND seq_id = ?", (model_id, seq_id))

    def complete_future(self, future_id: str, result_json: dict | None = None, result_pb: bytes | None = None) -> None:
        self._execute(
            "UPDATE futures SET state = 'done', result_json = ?, result_pb = ?, finished = ? WHERE id = ?",
            (json.dumps(result_json) if result_json is not None else None, result_pb, time.time(), future_id),
        )

    def fail_future(self, future_id: str, error: str, category: str) -> None:
        self._execute("UPDATE futures SET state = 'error', error = ?, category = ?, finished = ? WHERE id = ?",
                      (error, category, time.time(), future_id))

    def fail_unfinished_futures(self, error: str) -> int:
        """At start-up: requests that were in flight when the server stopped get a clear error."""
        cursor = self._execute(
            "UPDATE futures SET state = 'error', error = ?, category = 'server', finished = ? WHERE state = 'pending'",
            (error, time.time()),
        )
        return cursor.rowcount

    # checkpoints
    def add_checkpoint(self, path: str, model_id: str, owner: str, kind: str, name: str, directory: str,
                       base_model: str) -> None:
        self._insert("checkpoints", dict(path=path, model_id=model_id, owner=owner, kind=kind, name=name,
                                         directory=directory, base_model=base_model, created=time.time()),
                     replace=True)

    def checkpoint(self, path: str) -> dict | None:
        return self._one("SELECT * FROM checkpoints WHERE path = ?", (path,))


def _decode(row: sqlite3.Row) -> dict:
    out = dict(row)
    for key in _JSON_COLUMNS & out.keys():
        if out[key] is not None:
            out[key] = json.loads(out[key])
    return out
