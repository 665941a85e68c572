"""The two databases the `Store` runs on, behind one small seam; and `--store` URL parsing.

The Store writes its SQL once, for SQLite (`?` placeholders, SQLite column types, `rowid` as the
insertion order). A dialect runs it: `SQLite` as is, in WAL mode; `PostgreSQL` with `%s`
placeholders, 64-bit types (`BIGINT`, `DOUBLE PRECISION`, `BYTEA`) and an explicit identity column
named `rowid`. Both connect in autocommit mode, so every statement commits at once. psycopg is
imported only when a PostgreSQL store is opened.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

URL_FORMS = "sqlite:///RELATIVE/PATH, sqlite:////ABSOLUTE/PATH or postgresql://USER[:PASSWORD]@HOST[:PORT]/DB"


class StoreError(Exception):
    """A store URL that is malformed, names an unsupported database, or cannot be opened."""


def parse_store_url(url: str) -> tuple[str, Any]:
    """("sqlite", Path) or ("postgresql", url). SQLite paths follow SQLAlchemy: three slashes and a path
    relative to the working directory, four for an absolute one."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower() if sep else ""
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise StoreError(f"{redact(url)!r} has no file path; use {URL_FORMS}")
        return "sqlite", Path(rest[1:]).expanduser()
    if scheme in ("postgresql", "postgres"):
        return "postgresql", url
    raise StoreError(f"unsupported store URL {redact(url)!r}; use {URL_FORMS}")


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable URL>"


class SQLite:
    name = "sqlite"
    columns_sql = "SELECT name FROM pragma_table_info(?)"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.description = str(path)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")

    def execute(self, sql: str, args: tuple = ()) -> Any:
        return self._db.execute(sql, args)

    def ddl(self, sql: str) -> str:
        return sql

    @contextlib.contextmanager
    def schema_lock(self) -> Iterator[None]:
        yield

    def close(self) -> None:
        self._db.close()


_PG_TYPES = {"INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION", "BLOB": "BYTEA"}
_SCHEMA_LOCK_KEY = 0x74696E6B  # any constant: serializes schema set-up of servers starting together


class PostgreSQL:
    name = "postgresql"
    columns_sql = ("SELECT column_name AS name FROM information_schema.columns "
                   "WHERE table_schema = current_schema() AND table_name = ?")

    def __init__(self, url: str) -> None:
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError:
            raise StoreError("a PostgreSQL store needs psycopg: pip install 'tinkerd[postgres]'") from None
        self.description = redact(url)
        self._url, self._psycopg, self._dict_row = url, psycopg, dict_row
        self._db = self._connect()

    def _connect(self) -> Any:
        try:
            return self._psycopg.connect(self._url, autocommit=True, row_factory=self._dict_row)
        except self._psycopg.Error as exc:
            raise StoreError(f"cannot connect to {self.description}: {str(exc).strip()}") from None

    def execute(self, sql: str, args: tuple = ()) -> Any:
        if self._db.broken:  # the server restarted or the network dropped: the next statement reconnects
            self._db = self._connect()
        return self._db.execute(sql.replace("?", "%s"), args)

    def ddl(self, sql: str) -> str:
        sql = re.sub(r"\b(INTEGER|REAL|BLOB)\b", lambda m: _PG_TYPES[m[1]], sql)
        return re.sub(r"(CREATE TABLE IF NOT EXISTS \w+ \()", r"\1rowid BIGINT GENERATED ALWAYS AS IDENTITY, ", sql)

    @contextlib.contextmanager
    def schema_lock(self) -> Iterator[None]:
        with self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
            yield

    def close(self) -> None:
        self._db.close()
