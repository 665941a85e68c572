"""`tinkerd tune FILE --kind sft|dpo|rl [--budget 15m] [--grader ...] [--url URL]`: a job from the command line.

Submits the file to a running tinkerd (`--url` or $TINKER_BASE_URL) or, without one, to a local `tinkerd serve`
it starts for the duration (data in `--data-dir`, so the result checkpoint stays loadable by a later `tinkerd
serve` on that folder), then follows the job with a progress bar and prints the final report. Ctrl-C cancels the
job, which keeps its best checkpoint so far. It is a thin client of the job routes (the file goes up as a multipart
form, `curl -F file=@FILE` style); the work is the server's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import httpx
from tqdm import tqdm


def add_arguments(tune: argparse.ArgumentParser) -> None:
    tune.add_argument("file", type=Path, help="the JSONL data (docs/jobs.md: one format per kind)")
    tune.add_argument("--kind", required=True, choices=["sft", "dpo", "rl"])
    tune.add_argument("--budget", default="15m", help="minutes ('15m', '90s', '2h') or steps ('40 steps'); default 15m")
    tune.add_argument("--base-model", default=None, help="default: the server's first base model")
    tune.add_argument("--grader", default=None, help="rl: exact_match, contains, regex, json_schema, model_grader, "
                                                     "or a JSON object with type and its fields")
    tune.add_argument("--field", default=None, help="rl: the row field the grader compares with (default answer)")
    tune.add_argument("--pattern", default=None, help="rl, regex: the pattern (default: each row's field)")
    tune.add_argument("--schema", type=Path, default=None, help="rl, json_schema: a JSON Schema file")
    tune.add_argument("--rubric", default=None, help="rl, model_grader: a Yes/No question with {reply}")
    tune.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                      help="a hyperparameter (learning_rate, rank, batch_size, eval_every, patience, seed, ...)")
    tune.add_argument("--url", default=os.environ.get("TINKER_BASE_URL"), help="a running tinkerd (default: start one)")
    tune.add_argument("--api-key", default=os.environ.get("TINKER_API_KEY", "tml-tune"))
    tune.add_argument("--data-dir", type=Path, default=Path(os.environ.get("TINKERD_DATA_DIR", "~/.cache/tinkerd")),
                      help="for the local server: its data dir (default ~/.cache/tinkerd)")
    tune.add_argument("--model-cache", type=Path, default=None, help="for the local server: converted models")


def request_fields(args: argparse.Namespace) -> dict:
    """The job's fields besides its data, as `POST /api/v1/jobs` takes them in a form (JSON where not plain text)."""
    grader = args.grader
    if grader and grader.lstrip().startswith("{"):
        grader = json.loads(grader)
    elif grader:
        grader = {"type": grader}
        for key in ("field", "pattern", "rubric"):
            if getattr(args, key):
                grader[key] = getattr(args, key)
        if args.schema:
            grader["schema"] = json.loads(args.schema.read_text())
    hyper = {}
    for item in args.set:
        name, _, value = item.partition("=")
        hyper[name] = float(value) if any(c in value for c in ".e") else int(value)
    fields = {"kind": args.kind, "budget": args.budget, "base_model": args.base_model,
              "grader": json.dumps(grader) if grader else None, "hyperparameters": json.dumps(hyper) if hyper else None}
    return {k: v for k, v in fields.items() if v is not None}


def submit(http: httpx.Client, args: argparse.Namespace) -> httpx.Response:
    """The file streams as a multipart upload (no JSON escaping of a large file; the server bounds it)."""
    with open(args.file, "rb") as data:
        return http.post("/api/v1/jobs", data=request_fields(args), files={"file": (args.file.name, data)})


@contextmanager
def _local_server(args: argparse.Namespace):
    from tinkerd.local_server import LocalServer

    data_dir = args.data_dir.expanduser()
    cache = ["--model-cache", str(args.model_cache)] if args.model_cache else []
    print(f"starting a local tinkerd (data {data_dir}, log {data_dir / 'server.log'}) ...")
    with LocalServer(data_dir, *cache, own_session=True) as server:
        yield server.url


def tune(args: argparse.Namespace) -> int:
    request_fields(args)  # a bad --grader or --set fails before a local server starts
    with (nullcontext(args.url) if args.url else _local_server(args)) as url:
        http = httpx.Client(base_url=url, headers={"X-API-Key": args.api_key}, timeout=120)
        reply = submit(http, args)
        if reply.status_code != 200:
            print(f"tinkerd refused the job ({reply.status_code}): {reply.json().get('detail')}")
            return 2
        job = reply.json()
        print(f"job {job['id']}: {job['kind']} on {job['base_model']}, {job['rows']} rows, budget {args.budget}")
        job = follow(http, job["id"])
    print(report(job))
    return 0 if job["status"] == "succeeded" else 1


def follow(http: httpx.Client, job_id: str) -> dict:
    bar, shown_plan = None, False
    try:
        while True:
            job = http.get(f"/api/v1/jobs/{job_id}").json()
            if job["plan"] and not shown_plan:
                shown_plan = True
                tqdm.write("plan: " + ", ".join(f"{k} {v}" for k, v in job["plan"].items() if k != "reasons"))
                bar = tqdm(total=job["plan"]["steps"], desc=job["kind"], unit="step")
            if bar is not None and (job["progress"]["step"] or 0) > bar.n:
                last = (job["evals"] or {}).get("last") or {}
                bar.set_postfix({k: round(v, 4) for k, v in last.items() if k.startswith("held_out")}, refresh=False)
                bar.update((job["progress"]["step"] or 0) - bar.n)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(2)
    except KeyboardInterrupt:
        tqdm.write("cancelling (the best checkpoint so far is kept) ...")
        http.post(f"/api/v1/jobs/{job_id}/cancel")
        return follow(http, job_id)
    finally:
        if bar is not None:
            bar.close()


def report(job: dict) -> str:
    lines = [f"job {job['id']}: {job['status']}" + (f" ({job['error'].splitlines()[0]})" if job["error"] else "")]
    evals, result = job["evals"] or {}, job["result"]
    if evals.get("before") and evals.get("best"):
        for key, before in evals["before"].items():
            lines.append(f"  {key}: {before:.4g} before -> {evals['best']['metrics'].get(key, float('nan')):.4g} "
                         f"best (step {evals['best']['step']})")
    if result:
        lines += [f"  stopped: {result['stopped']}", f"  sampler checkpoint: {result['sampler_path']}",
                  f"  state checkpoint:   {result['state_path']}"]
    if job["started"] and job["finished"]:
        lines.append(f"  wall clock: {(job['finished'] - job['started']) / 60:.1f} min")
    return "\n".join(lines)
