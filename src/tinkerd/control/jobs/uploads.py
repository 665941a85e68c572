"""Uploaded files (`/api/v1/files`, in the shape of OpenAI's files API): a job's data file sent once and then
referenced by id (a job's `data_file`) instead of travelling inline in the job's JSON.

`Uploads.save` copies an upload to `DATA_DIR/files/<id>` through a temp file and refuses it, leaving nothing
behind, past the per-file limit (`--job-max-file-mb`, the same as a job's inline `data`) or past the owner's
quota on the bytes of all its files (`--file-quota-mb`, 0: none); a `fine-tune` file must be non-empty UTF-8
text. The Store keeps a row per file, and a caller sees only its own files (another key's id is "not found").
At start-up the leftovers of a crash (temp files, bytes whose row was never written) are removed.

Knows no HTTP (a route hands it a readable binary stream) and nothing of what a job does with the text
(`files.read_rows` checks it when a job names the file).
"""

from __future__ import annotations

import codecs
import threading
import uuid
from pathlib import Path
from typing import BinaryIO

from tinkerd.control.plane import NotFound
from tinkerd.protocol.types import BadRequest
from tinkerd.store.db import Store

PURPOSES = ("fine-tune", "user_data")  # OpenAI's names; the other purposes (batch, vision, ...) mean nothing here
CHUNK = 1 << 20


class TooLarge(BadRequest):
    """A file over the per-file limit or its owner's quota (413)."""

    status_code = 413


def too_large(max_bytes: int, field: str = "file") -> TooLarge:
    return TooLarge(f"{field}: more than this server's limit of {max_bytes} bytes per file "
                    "(tinkerd serve --job-max-file-mb)")


def file_json(row: dict) -> dict:
    """A file as OpenAI's API shows it (`openai.types.FileObject`)."""
    return {"id": row["id"], "object": "file", "bytes": row["size"], "created_at": int(row["created"]),
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}


class Uploads:
    def __init__(self, store: Store, root: Path, max_bytes: int, quota_bytes: int = 0) -> None:
        self.store, self.root, self.max_bytes, self.quota_bytes = store, root, max_bytes, quota_bytes
        self._lock = threading.Lock()  # a quota check and the row it admits are one step
        if root.is_dir():
            for path in root.iterdir():
                if path.suffix == ".part" or self.store.file(path.name) is None:
                    path.unlink(missing_ok=True)

    def too_large(self) -> TooLarge:
        return too_large(self.max_bytes)

    def save(self, owner: str, filename: str | None, purpose: str | None, stream: BinaryIO) -> dict:
        """Stores the stream's bytes as a new file of `owner`; its row. Raises `BadRequest` / `TooLarge`."""
        purpose = purpose or "fine-tune"
        if purpose not in PURPOSES:
            raise BadRequest(f"purpose: {purpose!r} is not used here; use {' or '.join(PURPOSES)} (the default "
                             "is fine-tune)")
        room = self.quota_bytes - self.store.file_bytes(owner) if self.quota_bytes else None
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.root.mkdir(parents=True, exist_ok=True)
        final, part = self.root / file_id, self.root / f"{file_id}.part"
        try:
            size = self._copy(stream, part, owner, room, text=purpose == "fine-tune")
            with self._lock:
                if self.quota_bytes and self.store.file_bytes(owner) + size > self.quota_bytes:
                    raise self._over_quota(owner)
                part.replace(final)
                self.store.add_file(file_id, owner, (filename or "").strip()[:255] or "upload", purpose, size)
        except BaseException:
            part.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            raise
        return self.store.file(file_id)

    def _copy(self, stream: BinaryIO, path: Path, owner: str, room: int | None, text: bool) -> int:
        decoder, size = codecs.getincrementaldecoder("utf-8")(), 0
        with open(path, "wb") as out:
            while chunk := stream.read(CHUNK):
                if text:
                    try:
                        decoder.decode(chunk)
                    except UnicodeDecodeError as e:
                        raise BadRequest(f"file: not UTF-8 text (byte {size + e.start}); a fine-tune file is JSONL, "
                                         "one example per line") from None
                size += len(chunk)
                if size > self.max_bytes:
                    raise self.too_large()
                if room is not None and size > room:
                    raise self._over_quota(owner)
                out.write(chunk)
        if text and size == 0:
            raise BadRequest("file: empty; a fine-tune file is JSONL, one example per line")
        if text:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise BadRequest("file: not UTF-8 text (it ends inside a character)") from None
        return size

    def _over_quota(self, owner: str) -> TooLarge:
        return TooLarge(f"file: this key's files would take more than its quota of {self.quota_bytes} bytes "
                        f"({self.store.file_bytes(owner)} in use); delete some with DELETE /api/v1/files/ID "
                        "(tinkerd serve --file-quota-mb)")

    def owned(self, owner: str, file_id: str, field: str = "file_id") -> dict:
        row = self.store.file(file_id) if isinstance(file_id, str) else None
        if row is None or row["owner"] != owner:
            raise NotFound(f"{field}: file {file_id!r} not found")
        return row

    def path(self, row: dict) -> Path:
        return self.root / row["id"]

    def text(self, owner: str, file_id, field: str) -> str:
        """An owned file's text, for a job that names it in `field`."""
        if not isinstance(file_id, str) or not file_id:
            raise BadRequest(f"{field}: expected a file id ('file-...', from POST /api/v1/files), got "
                             f"{type(file_id).__name__}")
        row = self.owned(owner, file_id, field)
        if row["size"] > self.max_bytes:
            raise TooLarge(f"{field}: {row['size']} bytes is over this server's limit of {self.max_bytes} bytes")
        try:
            return self.path(row).read_bytes().decode("utf-8")
        except FileNotFoundError:  # deleted meanwhile
            raise NotFound(f"{field}: file {file_id!r} not found") from None
        except UnicodeDecodeError as e:
            raise BadRequest(f"{field}: file {file_id!r} is not UTF-8 text (byte {e.start})") from None

    def listing(self, owner: str, purpose: str | None, order: str, after: str | None,
                limit: int) -> tuple[list[dict], bool]:
        """One page of the owner's files (newest first, or `order` "asc") after the file `after`; and whether
        more follow."""
        rows = [r for r in self.store.list_files(owner) if not purpose or r["purpose"] == purpose]
        if order == "asc":
            rows.reverse()
        if after:
            ids = [r["id"] for r in rows]
            if after not in ids:
                raise BadRequest(f"after: file {after!r} is not in this listing (ids come from its data)")
            rows = rows[ids.index(after) + 1:]
        return rows[:limit], len(rows) > limit

    def delete(self, owner: str, file_id: str) -> dict:
        """Jobs made from the file keep their own copy (`DATA_DIR/jobs/<job>/data.jsonl`)."""
        row = self.owned(owner, file_id)
        self.store.delete_file(row["id"])
        self.path(row).unlink(missing_ok=True)
        return row
