"""The job queue: accepts a job, starts one runner process per job, hears its reports, restarts it after a crash.

A job is a client of this server. Its runner (`python -m tinkerd.jobs.runner`) drives the server through the
tinker SDK, so its requests are batched with everyone's, journaled and visible as an ordinary run of the caller.

Credentials: the runner never sees the caller's API key (the server never keeps one: owners are key hashes).
Each start of a runner mints a fresh job token (`tml-job-...`), hands it to the process in its environment, and
stores only the token's SHA-256 in the job's row. `server.auth` accepts a live job token as the job's owner, so
the run belongs to the caller. A restart mints a new token, which also fences off any runner of an older start;
a finished job's token is erased.

Processes: runners are started from the event loop's thread (`tick`, a background task of the app), because
Linux's parent-death signal (set in the child, so a `kill -9` of the server takes its runners with it) fires when
the *thread* that forked exits. A graceful stop terminates runners and leaves their jobs `running`: the next
start resumes them from their last state checkpoint (`job_resume`), as it does after a crash.

States: queued -> running -> succeeded | failed | cancelled (running -> cancelling -> cancelled on cancel). One
running job per owner by default (`jobs_per_key`; 0: no limit); the others wait in creation order.
Knows no HTTP and no torch; what a runner does between its reports is `tinkerd.jobs`.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from tinkerd.control.jobs.files import cached_tokenizer, read_rows
from tinkerd.control.jobs.spec import JobInputError, parse_spec
from tinkerd.control.jobs.uploads import Uploads
from tinkerd.store.db import Store

log = logging.getLogger("tinkerd.jobs")
ACTIVE = ("running", "cancelling")
TERMINAL = ("succeeded", "failed", "cancelled")
TOKEN_PREFIX = "tml-job-"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the token fencing still stops an orphan at its next report


class JobManager:
    def __init__(self, store: Store, jobs_root: Path, url: str | None, base_models: dict, jobs_per_key: int = 1,
                 max_file_bytes: int = 32 << 20, uploads: Uploads | None = None) -> None:
        """`url`: where runners reach this server (None: jobs are accepted and stay queued). `base_models`: name ->
        (tokenizer_id, max_context_length), for the length check. `uploads`: the files a job's `data_file` names."""
        self.store, self.root, self.url, self.uploads = store, jobs_root, url, uploads
        self.base_models, self.jobs_per_key, self.max_file_bytes = base_models, jobs_per_key, max_file_bytes
        self.procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._tokenizers: dict[str, object] = {}

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    # ------------------------------------------------------------------------------------------ requests
    def submit(self, owner: str, kind, base_model: str, data=None, grader=None, budget=None,
               hyperparameters=None, data_file=None, data_file_field: str = "data_file",
               data_field: str = "data") -> dict:
        """Checks everything (raising `JobInputError`, or `NotFound` for a `data_file` the owner has not), stores a
        copy of the data and the row; the job starts at the next `tick`. The data is `data` (the JSONL text) or
        `data_file` (an uploaded file's id), exactly one; errors call them what the request did (`data_field`,
        `data_file_field`: a form's file part is `file`, OpenAI's name for data_file `training_file`). Nothing is
        computed here."""
        if base_model not in self.base_models:
            raise JobInputError(f"base_model: {base_model!r} is not served here; served: {sorted(self.base_models)}")
        spec = parse_spec(kind, base_model, grader, budget, hyperparameters)
        if (data is None) == (data_file is None):
            which = "both" if data is not None else "neither"
            raise JobInputError(f"{data_field}, {data_file_field}: {which} given; give {data_field} (the JSONL "
                                f"text) or {data_file_field} (an uploaded file's id, POST /api/v1/files)")
        if data_file is not None:
            if self.uploads is None:
                raise JobInputError(f"{data_file_field}: this server takes no uploaded files; send the text as data")
            data = self.uploads.text(owner, data_file, data_file_field)
            spec["data_file"] = data_file
        if not isinstance(data, str):
            raise JobInputError("data: expected the JSONL file's text")
        size = len(data.encode())
        if size > self.max_file_bytes:
            raise JobInputError(f"data: {size} bytes is over this server's limit of {self.max_file_bytes} bytes")
        tokenizer_id, context = self.base_models[base_model]
        if tokenizer_id not in self._tokenizers:
            self._tokenizers[tokenizer_id] = cached_tokenizer(tokenizer_id)
        rows = read_rows(spec["kind"], data, spec["grader"], self._tokenizers[tokenizer_id], context)
        job_id = f"job-{uuid.uuid4().hex[:12]}"
        folder = self.folder(job_id)
        folder.mkdir(parents=True)
        (folder / "data.jsonl").write_text(data)
        _write_atomic(folder / "rows.json", json.dumps(rows))
        spec["rows"] = len(rows)
        self.store.add_job(job_id, owner, spec["kind"], spec)
        return self.store.job(job_id)

    def cancel(self, job: dict) -> dict:
        """Queued: cancelled at once. Running: the runner stops at its next report and keeps the best checkpoint
        so far. Finished: unchanged."""
        with self._lock:
            job = self.store.job(job["id"])
            if job["status"] == "queued":
                self._finish(job["id"], "cancelled")
            elif job["status"] == "running":
                self.store.update_job(job["id"], status="cancelling")
                if job["id"] not in self.procs:
                    self._finish(job["id"], "cancelled")
        return self.store.job(job["id"])

    def report(self, job: dict, body: dict) -> dict:
        """A runner's report: progress, model id, resume state, result, and at the end its final status. The reply
        tells it whether to stop (`cancel`)."""
        fields = {k: body[k] for k in ("job_progress", "job_resume", "job_result", "model_id")
                  if body.get(k) is not None}
        with self._lock:
            if fields:
                self.store.update_job(job["id"], **fields)
            status = body.get("status")
            if status in TERMINAL:
                self._finish(job["id"], status, body.get("error"))
            current = self.store.job(job["id"])
        return {"cancel": current["status"] == "cancelling", "status": current["status"]}

    # ------------------------------------------------------------------------------------------ the loop
    def resume_all(self) -> int:
        """At start-up: jobs a previous process left running start again from their last state checkpoint; those
        being cancelled are cancelled (their best checkpoint so far is already in the row)."""
        n = 0
        for job in self.store.jobs_in(ACTIVE):
            if job["status"] == "cancelling":
                self._finish(job["id"], "cancelled")
            else:
                self.store.update_job(job["id"], status="queued", token_hash=None)
                n += 1
        return n

    def tick(self) -> None:
        """Reap runners that exited; start queued jobs whose owner has room. Call from one long-lived thread."""
        with self._lock:
            for job_id, proc in list(self.procs.items()):
                if proc.poll() is None:
                    continue
                del self.procs[job_id]
                job = self.store.job(job_id)
                if job and job["status"] in ACTIVE:
                    tail = _tail(self.folder(job_id) / "runner.log")
                    self._finish(job_id, "cancelled" if job["status"] == "cancelling" else "failed",
                                 f"the job runner exited with code {proc.returncode}: {tail}")
            if self.url is None:
                return
            running: dict[str, int] = {}
            for job in self.store.jobs_in(ACTIVE):
                running[job["owner"]] = running.get(job["owner"], 0) + 1
            for job in self.store.jobs_in(("queued",)):
                if self.jobs_per_key and running.get(job["owner"], 0) >= self.jobs_per_key:
                    continue
                self._start(job)
                running[job["owner"]] = running.get(job["owner"], 0) + 1

    def stop_all(self) -> None:
        """Graceful shutdown: runners are terminated, their jobs stay `running` and resume at the next start."""
        with self._lock:
            for proc in self.procs.values():
                proc.terminate()
            for proc in self.procs.values():
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            self.procs.clear()

    def _start(self, job: dict) -> None:
        token = TOKEN_PREFIX + secrets.token_urlsafe(24)
        self.store.update_job(job["id"], status="running", token_hash=token_hash(token),
                              started=job["started"] or time.time())
        folder = self.folder(job["id"])
        env = {**os.environ, "TINKERD_JOB_TOKEN": token, "TINKER_API_KEY": token}
        with open(folder / "runner.log", "a") as out:
            self.procs[job["id"]] = subprocess.Popen(
                [sys.executable, "-m", "tinkerd.jobs.runner", "--url", self.url, "--job", job["id"],
                 "--dir", str(folder)], stdout=out, stderr=subprocess.STDOUT, env=env,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        log.info("job %s (%s) started, runner pid %d", job["id"], job["kind"], self.procs[job["id"]].pid)

    def _finish(self, job_id: str, status: str, error: str | None = None) -> None:
        self.store.update_job(job_id, status=status, finished=time.time(), token_hash=None,
                              **({"error": error} if error else {}))
        log.info("job %s %s%s", job_id, status, f": {error}" if error else "")


def job_json(job: dict, for_runner: bool = False) -> dict:
    """A job as its owner sees it (`GET /api/v1/jobs/ID`); the runner also gets its resume state."""
    spec, progress = job["job_spec"], job["job_progress"] or {}
    out = {"id": job["id"], "kind": job["kind"], "status": job["status"], "created": job["created"],
           "started": job["started"], "finished": job["finished"], "base_model": spec["base_model"],
           "rows": spec.get("rows"), "budget": spec["budget"], "grader": spec["grader"],
           "hyperparameters": spec["hyperparameters"], "data_file": spec.get("data_file"),
           "training_run_id": job["model_id"],
           "plan": progress.get("plan"),
           "progress": {k: progress.get(k) for k in ("phase", "step", "steps", "elapsed_s")},
           "metrics": progress.get("metrics", []), "evals": progress.get("evals", {}),
           "result": job["job_result"], "error": job["error"]}
    if for_runner:
        out["resume"] = job["job_resume"]
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text()[-chars:]
    except OSError:
        return "(no log)"
