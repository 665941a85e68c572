"""Download links for checkpoint files: unguessable tokens, each naming the exact files it may serve.

A token is random (256 bits), lives in this process's memory for an hour (`URL_TTL_SECONDS`) and
names a set of files of one checkpoint, so no path outside that set is reachable; a link stops
working when it expires, when the server restarts, or when its checkpoint is deleted or expires
(the route checks the row at each download). `build_archive` makes the .tar.gz that SDKs before
0.36 download (`DATA_DIR/archives`, built once per checkpoint version: temp file, then rename; swept
once no link can reach it). Knows files and tokens, not the Store, not HTTP.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tinkerd.control.checkpoints import checkpoint_files
from tinkerd.control.plane import NotFound

URL_TTL_SECONDS = 3600


@dataclass(frozen=True)
class Grant:
    """What one download token may serve: {relative path: file}, for one checkpoint, until `expires_at`."""

    checkpoint_path: str
    files: dict[str, Path]
    expires_at: float


class DownloadGrants:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._grants: dict[str, Grant] = {}

    def grant(self, checkpoint_path: str, files: dict[str, Path], ttl: float = URL_TTL_SECONDS) -> tuple[str, Grant]:
        token, now = secrets.token_urlsafe(32), time.time()
        grant = Grant(checkpoint_path, files, now + ttl)
        with self._lock:
            self._grants = {t: g for t, g in self._grants.items() if g.expires_at > now}
            self._grants[token] = grant
        return token, grant

    def lookup(self, token: str) -> Grant | None:
        with self._lock:
            grant = self._grants.get(token)
        return grant if grant is not None and grant.expires_at > time.time() else None


def build_archive(archive_dir: Path, row: dict) -> Path:
    """The checkpoint's files as `<archive_dir>/<name>-<version>.tar.gz` (reused while the checkpoint is
    unchanged). Archives older than a download link's lifetime are swept first; reusing one refreshes its age.
    """
    archive_dir.mkdir(parents=True, exist_ok=True)
    stale_before = time.time() - URL_TTL_SECONDS - 600
    for old in archive_dir.iterdir():
        try:
            if old.stat().st_mtime < stale_before:
                old.unlink()
        except OSError:
            pass
    files = checkpoint_files(row["directory"])
    if not files:
        raise NotFound(f"checkpoint {row['path']!r} has no files on disk")
    version = hashlib.sha256(f"{row['path']}\0{row['created']!r}".encode()).hexdigest()[:32]
    archive = archive_dir / f"{row['name']}-{version}.tar.gz"
    if archive.is_file():
        os.utime(archive)
        return archive
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".tar.gz", dir=archive_dir)
    try:
        with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w:gz", compresslevel=1) as tar:
            for rel, path in files.items():
                tar.add(path, arcname=rel, recursive=False)
        os.replace(tmp, archive)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return archive
