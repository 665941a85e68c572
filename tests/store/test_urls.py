"""`--store` URLs: which database each names, the errors for bad ones, and psycopg staying unimported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tinkerd import cli
from tinkerd.local_server import free_port
from tinkerd.store.db import DEFAULT_FILE, StoreError, open_store
from tinkerd.store.dialects import parse_store_url, redact


def test_parse_store_url():
    assert parse_store_url("sqlite:///rel/db.sqlite3") == ("sqlite", Path("rel/db.sqlite3"))
    assert parse_store_url("sqlite:////abs/db.sqlite3") == ("sqlite", Path("/abs/db.sqlite3"))
    assert parse_store_url("postgresql://u@h:5432/db") == ("postgresql", "postgresql://u@h:5432/db")
    assert parse_store_url("postgres://u@h/db") == ("postgresql", "postgres://u@h/db")
    assert parse_store_url("POSTGRESQL://u@h/db")[0] == "postgresql"
    assert parse_store_url("SQLite:///x.db") == ("sqlite", Path("x.db"))


@pytest.mark.parametrize("url", ["mysql://u@h/db", "/just/a/path", "sqlite://", "sqlite:///", "sqlite:/x.db", ""])
def test_bad_urls_say_what_is_accepted(url):
    with pytest.raises(StoreError, match="sqlite:///"):
        parse_store_url(url)


def test_passwords_stay_out_of_messages():
    assert redact("postgresql://u:s3cret@h:5/db") == "postgresql://u:***@h:5/db"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
    with pytest.raises(StoreError) as raised:
        parse_store_url("mysql://u:s3cret@h/db")
    assert "s3cret" not in str(raised.value)


def test_default_and_sqlite_urls(tmp_path, monkeypatch):
    open_store(None, tmp_path / "data").close()
    assert (tmp_path / "data" / DEFAULT_FILE).is_file()
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///sub/x.sqlite3", tmp_path / "ignored")
    assert store.description == f"sqlite {Path('sub/x.sqlite3')}"
    store.close()
    assert (tmp_path / "sub" / "x.sqlite3").is_file() and not (tmp_path / "ignored").exists()


def test_postgres_without_psycopg_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    with pytest.raises(StoreError, match=r"tinkerd\[postgres\]"):
        open_store("postgresql://u@127.0.0.1:1/db", tmp_path)


def test_an_unreachable_postgres_is_a_clear_error(tmp_path):
    pytest.importorskip("psycopg")
    url = f"postgresql://u:pw@127.0.0.1:{free_port()}/db?connect_timeout=3"
    with pytest.raises(StoreError, match="cannot connect to postgresql://u:\\*\\*\\*@127.0.0.1") as raised:
        open_store(url, tmp_path)
    assert "pw@" not in str(raised.value)


def test_the_server_never_imports_psycopg_for_sqlite(tmp_path):
    code = ("import sys, tinkerd.server.app, tinkerd.cli\n"
            "from tinkerd.store.db import open_store\n"
            f"open_store(None, __import__('pathlib').Path({str(tmp_path)!r})).close()\n"
            "assert 'psycopg' not in sys.modules, 'psycopg was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_errors_name_the_store_flag(tmp_path, capsys):
    parse = cli._parser().parse_args
    with pytest.raises(SystemExit) as raised:
        cli.serve(parse(["serve", "--data-dir", str(tmp_path), "--store", "mysql://u@h/db"]))
    assert str(raised.value).startswith("tinkerd serve: --store: unsupported store URL 'mysql://u@h/db'")
    with pytest.raises(cli.CommandError, match="^--store: .*has no file path"):
        cli.list_runs(parse(["runs", "--data-dir", str(tmp_path), "--store", "sqlite://"]))
    with pytest.raises(cli.CommandError, match="no tinkerd store at"):
        cli.list_checkpoints(parse(["checkpoints", "--store", f"sqlite:///{tmp_path / 'missing.sqlite3'}"]))
    assert not (tmp_path / "missing.sqlite3").exists()
    with pytest.raises(SystemExit):
        parse(["serve", "--help"])
    assert "--store URL" in capsys.readouterr().out
